"""The `RLConfig` every RL test starts from: CPU, fp32, no saving or reporting, deterministic, no KL term."""

from training.rl import RLConfig


def rl_config(tmp_path, **fields) -> RLConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        beta=0.0,
        seed=0,
    )
    return RLConfig(**(base | fields))
