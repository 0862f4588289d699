"""Packaging: the kernels and modules need torch (and ninja) only; a wheel carries
the C++ sources and builds the extension on a fresh machine, finding ninja from
its PyPI package when none is on PATH."""
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DEPS = ("sentencepiece", "sacrebleu", "matplotlib", "yaml", "tqdm")


def test_modules_import_without_the_model_extras():
    """fastseq, fastseq.nn and fastseq.ops import and run with every model-job
    dependency unimportable (the "models" extra not installed)."""
    script = textwrap.dedent(f"""
        import sys
        for name in {MODEL_DEPS!r}:
            sys.modules[name] = None  # import fails, as when it is not installed
        import torch, fastseq, fastseq.nn, fastseq.ops
        with fastseq.backend("reference"):
            out, h = fastseq.nn.GRU(3, 4)(torch.randn(2, 1, 3))
        print("ok", tuple(out.shape))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (2, 1, 4)" in proc.stdout


@pytest.mark.parametrize("missing", ["sentencepiece", "yaml"])
def test_model_commands_without_the_extras_say_what_to_install(missing, tmp_path):
    """A fresh interpreter where ``missing`` is not importable: one line naming the extra."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules[{missing!r}] = None  # as if not installed
        from fastseq.cli import main
        main(["train", "--config", "multi30k-cpu", "--out", {str(tmp_path / "run")!r}, "--max-steps", "1"])
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"fastseq train: needs the model jobs' dependencies ({missing} is not "
                                   "installed): pip install 'fastseq[models]'")


def test_dependencies_are_declared_where_they_are_used():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0] for d in meta["dependencies"]}
    assert core == {"torch", "ninja"}
    models = {d.split(">")[0].split("=")[0].lower() for d in meta["optional-dependencies"]["models"]}
    assert {"sentencepiece", "sacrebleu", "matplotlib", "pyyaml", "tqdm", "numpy"} <= models
    assert "fastseq[models]" in meta["optional-dependencies"]["test"]


@pytest.mark.slow
def test_wheel_builds_the_extension_in_a_fresh_environment(tmp_path):
    """Build a wheel; it holds the C++ sources. Install it into a new virtual
    environment (torch from this interpreter's site-packages, ninja's wheel into
    the venv as pip would) and build the extension from it, run by the venv's
    python without activating it, with no ninja on PATH: ninja's package is found."""
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = wheels.glob("fastseq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastseq/csrc/cpu/rnn.cpp" in names and "fastseq/csrc/cpu/common.h" in names
    assert "fastseq/data/multi30k/train.de.gz" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # The wheel, and ninja's own wheel into the venv (its binary goes to venv/bin,
    # which is not on PATH: the environment is not activated).
    for args in (["--no-deps", "--no-index", str(wheel)], ["--no-deps", "--ignore-installed", "ninja>=1.11"]):
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (venv / "bin" / "ninja").is_file()
    # PATH: the system's tools (the compiler) but no ninja anywhere on it.
    tools = tmp_path / "bin"
    tools.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for exe in Path(d).glob("*") if Path(d).is_dir() else ():
            if exe.name != "ninja" and not (tools / exe.name).exists():
                (tools / exe.name).symlink_to(exe)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTSEQ_BACKEND")}
    env["PATH"] = str(tools)
    env["FASTSEQ_CACHE"] = str(tmp_path / "cache")
    script = textwrap.dedent("""
        import shutil, fastseq
        from fastseq.backend import extension
        assert shutil.which("ninja") is None, shutil.which("ninja")
        print(fastseq.__file__)
        print(extension.csrc_dir())
        print(extension.status())
    """)
    proc = subprocess.run([str(py), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert str(venv) in lines[0] and lines[1].endswith(os.path.join("fastseq", "csrc"))
    assert lines[2] == "(True, 'ok')", proc.stdout + proc.stderr[-3000:]
