"""The configs are found however resexp is installed: a wheel (`pip install .`), an editable install
(the other tests), or a bare checkout on PYTHONPATH (how the GPU machine runs it)."""

import subprocess
import sys
import sysconfig
import zipfile

import yaml
from helpers import REPO

SITE_PACKAGES = sysconfig.get_paths()["purelib"]


def run_without_site(pythonpath: list[str], cwd) -> subprocess.CompletedProcess:
    """`python -S -m resexp ...`: -S skips site-packages' .pth files, so the editable install's
    import hook is out of the way and only `pythonpath` (plus the dependencies) is seen."""
    code = "import resexp.cli, sys; print('FROM', resexp.cli.__file__); sys.argv[1:] = ['train', 'model=resnet50', '--cfg', 'job', '--resolve']; resexp.cli.main()"
    return subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=cwd,
        env={"PYTHONPATH": ":".join([*pythonpath, SITE_PACKAGES]), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_printed_config(result, expected_origin):
    assert result.returncode == 0, result.stderr
    origin, _, config = result.stdout.partition("\n")
    assert origin.startswith(f"FROM {expected_origin}")
    config = yaml.safe_load(config)
    assert config["model"]["depth"] == 50 and config["shortcut"] == "projection"


def test_a_built_wheel_carries_the_configs(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp_path / "dist").glob("resexp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {
        "resexp/conf/train.yaml",
        "resexp/conf/model/resnet1202.yaml",
        "resexp/conf/hydra/job_logging/rich.yaml",
    } <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what `pip install` puts in site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check_printed_config(run_without_site([str(site)], cwd=elsewhere), str(site))


def test_a_bare_checkout_on_pythonpath_finds_conf(tmp_path):
    check_printed_config(run_without_site([str(REPO)], cwd=tmp_path), str(REPO))
