"""patches/make_patches.py: the committed patches are what it generates from the protocol module
and OpenCLIP's pristine sources, and ``--check`` catches any drift (no download here: the sources
are the installed wheel and what ``.ci/matrix`` or an earlier run left in the cache)."""

import importlib.metadata
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys

import pytest

from m2mix_openclip.integration import plugins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "patches", "make_patches.py")
spec = importlib.util.spec_from_file_location("make_patches", SCRIPT)
make_patches = sys.modules["make_patches"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_patches)

INSTALLED = importlib.metadata.version("open_clip_torch")
SITE = os.path.dirname(os.path.dirname(importlib.util.find_spec("open_clip").origin))


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)


def offline_source(version):
    """``--source`` arguments for ``version`` without a download, or None."""
    if version == INSTALLED:
        return ["--source", SITE]
    try:
        make_patches.find_source(version, {}, make_patches.DEFAULT_CACHE, offline=True)
    except make_patches.PatchError:
        return None
    return []


def added_file(patch_text):
    """The text of the file a patch creates (its ``--- /dev/null`` part)."""
    lines = patch_text.split("--- /dev/null\n", 1)[1].splitlines(keepends=True)[2:]  # past +++ and @@
    added = itertools.takewhile(lambda line: line.startswith("+"), lines)
    return "".join(line[1:] for line in added)


@pytest.mark.parametrize("version", sorted(make_patches.TRAINERS))
def test_each_patch_adds_the_protocol_module_verbatim(version):
    with open(os.path.join(ROOT, "patches", make_patches.patch_name(version)), encoding="utf-8") as f:
        text = f.read()
    with open(plugins.__file__, encoding="utf-8") as f:
        assert added_file(text) == f.read()
    assert f"+++ b/src/{make_patches.TRAINERS[version]}/plugins.py" in text


@pytest.mark.skipif(INSTALLED not in make_patches.TRAINERS, reason=f"no patch is made from OpenCLIP {INSTALLED}")
def test_check_passes_on_the_committed_patch():
    done = run_script("--check", "--offline", "--version", INSTALLED, "--source", SITE)
    assert done.returncode == 0, done.stderr
    assert f"{make_patches.patch_name(INSTALLED)}: up to date (from {SITE})" in done.stdout


@pytest.mark.parametrize("version", sorted(set(make_patches.TRAINERS) - {INSTALLED}))
def test_check_passes_on_the_other_committed_patches(version):
    source = offline_source(version)
    if source is None:
        pytest.skip(f"no offline source of OpenCLIP {version}: `.ci/matrix {version}`, or `python "
                    "patches/make_patches.py --check` once (downloads its wheel), provides one")
    done = run_script("--check", "--offline", "--version", version, *source)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(INSTALLED not in make_patches.TRAINERS, reason=f"no patch is made from OpenCLIP {INSTALLED}")
@pytest.mark.parametrize("old, new", [
    ('ARGUMENT_GROUP = "loss and evaluation plugins"', 'ARGUMENT_GROUP = "plugins"'),  # the protocol module
    ("    loss = plugins.create_loss(args, loss_state)", "    loss = plugins.create_loss(args)"),  # a trainer edit
])
def test_check_fails_on_a_tampered_patch(tmp_path, old, new):
    name = make_patches.patch_name(INSTALLED)
    shutil.copy(os.path.join(ROOT, "patches", name), tmp_path / name)
    text = (tmp_path / name).read_text()
    assert text.count(old) == 1
    (tmp_path / name).write_text(text.replace(old, new))
    done = run_script("--check", "--offline", "--version", INSTALLED, "--source", SITE, "--patches-dir", str(tmp_path))
    assert done.returncode == 1
    assert f"{tmp_path / name}: differs from what patches/make_patches.py generates" in done.stderr
    assert f"\n-+{new}\n" in done.stderr and f"\n++{old}\n" in done.stderr  # committed vs generated, as added
    assert text.replace(old, new) == (tmp_path / name).read_text()  # --check writes nothing


def test_an_anchor_that_does_not_fit_names_the_edit():
    text = "import argparse\nimport ast\n\n\ndef parse_args(args):\n    parser = argparse.ArgumentParser()\n"
    with pytest.raises(make_patches.PatchError, match=r"training/params.py: the anchor of the edit for --loss, "
                                                      r"the plugin flags and their checks .* occurs 0 times"):
        make_patches.apply_edits("training", "params.py", text, make_patches.EDITS)


def test_a_modified_install_is_not_taken_for_the_pristine_source(tmp_path):
    """A site-packages whose trainer differs from its wheel's RECORD (patched, say) is refused."""
    dist_info = f"open_clip_torch-{INSTALLED}.dist-info"
    shutil.copytree(os.path.join(SITE, "open_clip"), tmp_path / "open_clip", ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copytree(os.path.join(SITE, dist_info), tmp_path / dist_info)
    package = make_patches.TRAINERS.get(INSTALLED, "open_clip_train")
    shutil.copytree(os.path.join(SITE, package), tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    source = make_patches.folder_source(str(tmp_path))
    assert source.version == INSTALLED and source.read(f"{package}/main.py")
    with open(tmp_path / package / "main.py", "a") as f:
        f.write("# patched\n")
    with pytest.raises(make_patches.PatchError, match=rf"{package}/main.py differs from its wheel's RECORD"):
        source.read(f"{package}/main.py")


def test_a_source_of_another_release_is_refused(tmp_path):
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "version.py").write_text("__version__ = '2.26.1'\n")
    done = run_script("--check", "--offline", "--source", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"make_patches.py: error: --source {tmp_path} holds OpenCLIP 2.26.1; patches "
                                   "are made from 2.24.0, 3.3.0")
