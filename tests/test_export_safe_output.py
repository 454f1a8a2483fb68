"""Safe output folders (issue 10 item 4 / issue 12 item 1): each case is a test."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from graphquant.export import safe_output as S


def test_unrelated_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_text("precious")
    with pytest.raises(S.OutputDirError, match="not empty and was not written by graphquant.*--overwrite"):
        S.check_output_dir(out)
    with pytest.raises(S.OutputDirError):
        with S.atomic_output_dir(out) as tmp:
            (tmp / "x").write_text("new")
    assert (out / "holiday.jpg").read_text() == "precious"
    with S.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "new" and not (out / "holiday.jpg").exists()
    assert S.is_graphquant_output(out)


def test_previous_graphquant_output_is_replaced(tmp_path):
    out = tmp_path / "q"
    with S.atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with S.atomic_output_dir(out) as tmp:  # marker present: no --overwrite needed
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b", S.MARKER]
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temp or old folder left


def test_output_equal_to_or_containing_the_input_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(S.OutputDirError, match="is the input model folder"):
        S.check_output_dir(model, inputs=[str(model)])
    with pytest.raises(S.OutputDirError, match="contains the input"):
        S.check_output_dir(tmp_path, inputs=[str(model)], overwrite=True)
    with pytest.raises(S.OutputDirError, match="not a folder"):
        S.check_output_dir(model / "config.json")


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_or_interrupted_save_keeps_previous_result_and_no_partial_folder(tmp_path, exc):
    out = tmp_path / "q"
    with S.atomic_output_dir(out) as tmp:
        (tmp / "weights").write_text("good")
    with pytest.raises(type(exc)):
        with S.atomic_output_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise exc
    assert (out / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_umask_is_honoured(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "q"
        with S.atomic_output_dir(out) as tmp:
            (tmp / "f.json").write_text("{}")
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert stat.S_IMODE((out / "f.json").stat().st_mode) == 0o644
        assert stat.S_IMODE((out / S.MARKER).stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_unwritable_parent_is_refused_before_work(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(S.OutputDirError, match="cannot write next to"):
            S.check_output_dir(ro / "out")
    finally:
        ro.chmod(0o755)


def test_shared_tensors_are_written_and_sharded(tmp_path):
    """Tied weights (one storage, two names) save; shards get an index."""
    from graphquant.export.shards import INDEX, read_sharded, write_sharded

    emb = torch.randn(64, 32)
    tensors = {"embed.weight": emb, "lm_head.weight": emb, "a": torch.arange(10.0)}
    files = write_sharded(tensors, tmp_path, max_shard_size=4000)
    assert INDEX in files and len(files) == 4
    back = read_sharded(tmp_path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
