"""fastprerl: reinforcement learning of LLM reasoning in pre-train space (PreRL, NSR-PreRL, DSRL)."""

__version__ = "0.1.0"
