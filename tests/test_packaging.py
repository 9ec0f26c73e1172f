"""raypref as an installed package: a non-editable install into a fresh venv works from any directory
(no checkout on sys.path: the Serve apps, the jobs' entry points and the shipped assets are in the wheel)."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_runs_outside_the_checkout(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies come from this environment (a path line only: its .pth files, such as the
    # editable raypref finder, are not run), raypref itself from the wheel built here
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    out = tmp_path / "eval"
    raypref = str(venv / "bin" / "raypref")
    where = subprocess.run([str(py), "-c", "import raypref, raypref.serving.images; print(raypref.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0 and where.stdout.strip().startswith(site), where.stdout + where.stderr[-2000:]
    for args in (["--help"], ["serve", "--help"], ["train", "--help"],
                 ["shapes-eval", "--generator", "teacher:clean", "--n-per-category", "5", "--out", str(out)]):
        res = subprocess.run([raypref, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (args, res.stdout[-2000:], res.stderr[-2000:])
    assert (out / "scores.json").exists() and len(list((out / "images").glob("*.png"))) == 30
