"""The names of a run's metrics, one place for all: TensorBoard's tags of its curves, and the keys of
metrics.json's final and best values, which are the same names."""

TRAIN_ERROR, TRAIN_LOSS, LR = "error/train", "loss/train", "lr"  # %, mean cross-entropy, the step's rate
TOP5 = "error_top5"  # % of images whose label is not among the 5 highest scores (ImageNet's)
HELD_OUT_METRICS = ("error", "loss", TOP5)  # what an evaluation gives (evaluate.evaluate's keys)


def held_out_tag(metric: str, name: str) -> str:
    """`error/test`, `loss/val`, `error_top5/test`: a held-out set's metric."""
    return f"{metric}/{name}"


def iteration_tag(tag: str) -> str:
    """Where the lowest value of an error tag was reached: `iteration/test` for `error/test`."""
    return tag.replace("error/", "iteration/")


def best_tag(tag: str) -> str:
    """error/test -> result/best_error_test: the lowest value of that curve (HPARAMS shows it)."""
    return f"result/best_{tag.replace('/', '_')}"


TEST_ERROR, VAL_ERROR = held_out_tag("error", "test"), held_out_tag("error", "val")
TEST_TOP5 = held_out_tag(TOP5, "test")
