"""The identity and name of every model preset on every dataset it composes with, and of its variants on
CIFAR-10, as the safety net of issue 34: a changed identity refuses to resume every run that has it.
`python tests/identities.py` writes tests/data/identities.json (once, before a change to identity);
tests/test_structure.py checks that the code still gives the same."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from resexp import checkpoint, config
from resexp.errors import ResexpError

RECORD = Path(__file__).parent / "data" / "identities.json"
# Values set on the composed config of each preset on CIFAR-10 (as the same override would: composing
# again for each costs a tenth of a second).
VARIANTS = {"shortcut": "B", "shortcut ": "gated", "model.residual": False, "model.preactivation": True}


def cases() -> list[tuple[str, str]]:
    models = sorted(path.stem for path in (config.config_dir() / "model").glob("*.yaml"))
    datasets = sorted(path.stem for path in (config.config_dir() / "data").glob("*.yaml"))
    return [(m, d) for m in models for d in datasets]


def identity(cfg: DictConfig) -> dict | str:
    """What a run of this config records (its identity and name), or the one line that refuses it."""
    try:
        values = config.flat(cfg)
        config.check_values(values)
        net = config.net_spec(cfg)
        config.data_builder(cfg)
    except ResexpError as error:
        return f"refused: {error}"
    recorded = checkpoint.identity({**values, "processes": 1})
    recorded["shortcut"] = net.shortcut
    return {"name": net.name, "identity": {key: checkpoint.plain(value) for key, value in recorded.items()}}


def record() -> dict[str, dict | str]:
    found = {}
    for model, data in cases():
        cfg = config.compose(f"model={model}", f"data={data}")
        found[f"model={model} data={data}"] = identity(cfg)
        for key, value in VARIANTS.items() if data == "cifar10" else ():
            varied = cfg.copy()
            OmegaConf.update(varied, key.strip(), value)
            found[f"model={model} data={data} {key.strip()}={value}"] = identity(varied)
    return found


if __name__ == "__main__":
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
    print(f"{RECORD}: {len(cases())} cases", file=sys.stderr)
