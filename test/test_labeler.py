"""The labeler (softmax top-k over the head and taught prototypes), prototypes on disk, and teaching.

Teaching runs end to end through the Engine on a fixed random tiny model: two actions that look
nothing alike (a bright bar sweeping across a dark room; a still checkerboard) are separated by any
encoder, so a label taught from a few clips of one must win on new clips of it.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from hiera_perception import cli, dataset
from hiera_perception.checkpoint import save_checkpoint
from hiera_perception.config import get_config
from hiera_perception.engine import Engine
from hiera_perception.labeler import COSINE_TEMPERATURE, Labeler, Prototypes, prototypes_path
from hiera_perception.model import Hiera

TINY = "hiera_tiny_8x64"
T = 8  # frames of a TINY clip


def head(k: int, c: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(c, k)
    with torch.no_grad():
        lin.bias.normal_(0.0, 0.5)
    return lin


# ---------------------------------------------------------------------------------------------------
# Softmax top-k over the head


def test_top_k_is_the_softmax_of_the_logits():
    names = [f"a{i}" for i in range(6)]
    lab = Labeler(names, head(6, 16), top_k=3)
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.0, 1.9])
    got_names, got_scores = lab(torch.randn(16), logits)
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, descending=True)[:3]
    assert got_names == ["a1", "a5", "a3"] == [names[i] for i in order]
    assert got_scores == probs[order].tolist()  # exact: the same float32 softmax
    assert got_scores == sorted(got_scores, reverse=True)


def test_top_k_larger_than_the_classes_and_default_names():
    lab = Labeler([], head(3, 8), top_k=5)
    assert lab.names == ["class_0", "class_1", "class_2"]
    names, scores = lab(torch.randn(8), torch.tensor([1.0, 3.0, 2.0]))
    assert names == ["class_1", "class_2", "class_0"] and len(scores) == 3
    assert math.isclose(sum(scores), 1.0, rel_tol=1e-6)


def test_headless_without_prototypes_gives_nothing():
    assert Labeler([], None)(torch.randn(8), None) == ([], [])


def test_labeler_arguments_are_checked():
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        Labeler([], head(3, 8), top_k=0)
    with pytest.raises(ValueError, match="2 label names for a head of 3 classes"):
        Labeler(["a", "b"], head(3, 8))


# ---------------------------------------------------------------------------------------------------
# Prototypes


def test_prototypes_add_save_load_round_trip(tmp_path):
    path = tmp_path / "m.pt.prototypes.json"
    rng = np.random.default_rng(0)
    protos = Prototypes(4, path)
    assert protos.names == [] and protos.matrix().shape == (0, 4)
    a = rng.normal(size=(3, 4))
    assert protos.add("wave", a) == 3
    assert protos.add("wave", rng.normal(size=(2, 4))) == 5  # reinforcing adds to what it knew
    assert protos.add("nod", rng.normal(size=4)) == 1  # one embedding [C] is one clip
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # atomic: no temp file left
    data = json.loads(path.read_text())
    assert data["dim"] == 4 and data["labels"]["wave"]["count"] == 5 and data["labels"]["nod"]["count"] == 1

    again = Prototypes(4, path)
    assert again.names == ["wave", "nod"]
    assert torch.equal(again.matrix(), protos.matrix())
    m = again.matrix()
    assert m.shape == (2, 4) and torch.allclose(m.norm(dim=1), torch.ones(2))
    assert again.remove("nod") and not again.remove("nod") and again.names == ["wave"]
    assert Prototypes(4, path).names == ["wave"]  # every change is saved


def test_prototype_is_the_mean_direction_of_unit_embeddings():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(5, 6)) * rng.uniform(0.1, 10, size=(5, 1))  # norms must not weigh
    protos = Prototypes(6)
    protos.add("x", emb)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    np.testing.assert_allclose(protos.matrix()[0].numpy(), mean / np.linalg.norm(mean), rtol=1e-6)


def test_prototype_file_errors(tmp_path):
    path = tmp_path / "p.json"
    p = Prototypes(4, path)
    p.add("a", np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"p\.json: unreadable taught labels: embedding size 4, the model's is 8"):
        Prototypes(8, path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"p\.json: unreadable taught labels"):
        Prototypes(4, path)
    with pytest.raises(ValueError, match="non-empty name"):
        Prototypes(4).add("  ", np.ones((1, 4)))
    with pytest.raises(ValueError, match="no clips to teach 'a'"):
        Prototypes(4).add("a", np.zeros((0, 4)))
    # embeddings of another width were re-sliced into rows of 4 and taught as garbage: [3, 8] became 6 clips
    with pytest.raises(ValueError, match=r"embeddings must be \[N, 4\], got \[3, 8\]"):
        Prototypes(4).add("a", np.ones((3, 8)))
    with pytest.raises(ValueError, match="not all finite"):
        Prototypes(4).add("a", np.full((1, 4), np.nan))


@pytest.mark.parametrize("text, why", [
    ("[]", "not a JSON object"),
    ('{"dim": 4, "labels": []}', "not a JSON object"),
    ('{"dim": 4, "labels": {"x": {"sum": [1, 2, 3], "count": 2}}}', "label 'x': 'sum' must be 4 finite numbers"),
    ('{"dim": 4, "labels": {"x": {"sum": [1, 2, 3, NaN], "count": 2}}}', "'sum' must be 4 finite numbers"),
    ('{"dim": 4, "labels": {"x": {"sum": [1, 2, 3, 4], "count": 0}}}', "'count' must be a whole number >= 1"),
    ('{"dim": 4, "labels": {"x": {"sum": [1, 2, 3, 4]}}}', "'count'"),
])
def test_a_malformed_prototypes_file_is_refused_when_read(tmp_path, text, why):
    """A file that loaded 'fine' with a wrong-length sum made every later clip fail in the labeler (the node
    published nothing); other shapes were AttributeErrors."""
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"p\.json: unreadable taught labels: .*" + re.escape(why)):
        Prototypes(4, path)


def _teach_many(path: str, prefix: str, n: int) -> None:
    protos = Prototypes(4, path)
    for i in range(n):
        protos.add(f"{prefix}{i}", np.full((1, 4), i + 1.0))


def test_processes_sharing_the_file_keep_each_others_labels(tmp_path):
    """Two nodes serving one model share its taught labels: each saved what it had in memory, so the second to teach
    erased the first's label (and a running node undid `teach --forget`). A change is made to the file as it is now,
    and each sees the other's changes at its next clip."""
    import multiprocessing

    path = tmp_path / "m.prototypes.json"
    front, rear = Prototypes(4, path), Prototypes(4, path)
    front.add("alpha", np.ones((2, 4)))
    rear.add("beta", np.ones((3, 4)))
    assert json.loads(path.read_text())["labels"].keys() == {"alpha", "beta"}
    assert front.names == ["alpha", "beta"] and front.count("beta") == 3  # picked up without a restart
    names, matrix = front.snapshot()
    assert matrix.shape == (2, 4)
    assert Prototypes(4, path).remove("alpha")  # `teach --forget alpha` while both run
    assert front.names == rear.names == ["beta"]
    path.write_text("{broken")  # an unreadable file keeps what is served, and is named
    assert front.names == ["beta"]
    path.unlink()  # removed by hand: nothing taught any more
    assert front.names == [] and front.matrix().shape == (0, 4)

    # processes teaching at the same time lose nothing (each change is made under the folder's lock)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_teach_many, args=(str(path), prefix, 15)) for prefix in ("a", "b", "c")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    assert sorted(Prototypes(4, path).names) == sorted(f"{p}{i}" for p in "abc" for i in range(15))


def test_forgetting_a_label_never_taught_writes_nothing(tmp_path):
    """`teach --forget typo` created the file (and its folder), or failed on a read-only one instead of saying the
    label is not there."""
    path = tmp_path / "new" / "p.json"
    assert not Prototypes(4, path).remove("typo") and not path.parent.exists()
    protos = Prototypes(4, tmp_path / "p.json")
    protos.add("a", np.ones((1, 4)))
    before = (tmp_path / "p.json").stat()
    assert not protos.remove("typo")
    after = (tmp_path / "p.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_what_cannot_be_saved_is_not_learnt(tmp_path):
    """A failed save left the label served until the next start, then gone, though the caller was told it failed."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    protos = Prototypes(4, blocker / "p.json")  # its folder cannot be made
    with pytest.raises(OSError):
        protos.add("a", np.ones((2, 4)))
    assert protos.names == [] and protos.matrix().shape == (0, 4)
    ok = Prototypes(4, tmp_path / "p.json")
    ok.add("a", np.ones((2, 4)))
    ok.path = blocker / "p.json"
    with pytest.raises(OSError):
        ok.remove("a")
    assert ok.names == ["a"] and ok.count("a") == 2


def test_prototypes_path_is_beside_the_model(tmp_path):
    assert prototypes_path(tmp_path / "models" / "m.pt") == tmp_path / "models" / "m.pt.prototypes.json"


# ---------------------------------------------------------------------------------------------------
# Imprinted weights and the cosine classifier


def test_imprinted_logit_equals_head_scale_times_cosine():
    C, K = 16, 4
    lin = head(K, C, seed=3)
    rng = np.random.default_rng(3)
    taught = {"taught": rng.normal(size=(3, C)), "other": rng.normal(size=(2, C))}
    protos = Prototypes(C)
    for name, emb in taught.items():
        protos.add(name, emb)
    lab = Labeler(list("abcd"), lin, top_k=K + 2, prototypes=protos)
    e = torch.randn(C, generator=torch.Generator().manual_seed(3)) * 3.0
    logits = lin(e).detach()
    names, scores = lab(e, logits)

    # independently, in float64: logit_p = mean row norm * cos(p, e) * |e| + mean bias
    W, b, ev = lin.weight.detach().double(), lin.bias.detach().double(), e.double()
    expected = dict(zip("abcd", logits.double().tolist()))
    for name in ("taught", "other"):
        emb = torch.from_numpy(taught[name])
        p = (emb / emb.norm(dim=1, keepdim=True)).mean(dim=0)  # mean of the unit embeddings
        cos = torch.dot(p, ev) / (p.norm() * ev.norm())
        expected[name] = (W.norm(dim=1).mean() * cos * ev.norm() + b.mean()).item()
    z = torch.tensor(list(expected.values()), dtype=torch.float64)
    probs = dict(zip(expected, torch.softmax(z, dim=0).tolist()))
    assert sorted(names) == sorted(expected)
    assert names == sorted(expected, key=lambda n: -probs[n])
    for n, s in zip(names, scores):
        assert math.isclose(s, probs[n], rel_tol=1e-5, abs_tol=1e-7), n


def test_headless_model_ranks_taught_labels_by_cosine():
    C = 8
    protos = Prototypes(C)
    protos.add("left", np.eye(C)[0])
    protos.add("up", np.eye(C)[1])
    protos.add("diag", (np.eye(C)[0] + np.eye(C)[2]))
    lab = Labeler([], None, top_k=3, prototypes=protos)
    e = torch.tensor([2.0, 0.5, 1.0, 0, 0, 0, 0, 0])
    names, scores = lab(e, None)
    cos = {"left": 2.0, "up": 0.5, "diag": 3.0 / math.sqrt(2)}
    cos = {k: v / e.norm().item() for k, v in cos.items()}
    z = torch.tensor([COSINE_TEMPERATURE * cos[n] for n in ("left", "up", "diag")], dtype=torch.float64)
    probs = dict(zip(("left", "up", "diag"), torch.softmax(z, dim=0).tolist()))
    assert names == ["diag", "left", "up"]
    for n, s in zip(names, scores):
        assert math.isclose(s, probs[n], rel_tol=1e-5), n


# ---------------------------------------------------------------------------------------------------
# Teaching end to end


def sweep(rng: np.random.Generator, n: int = T, h: int = 72, w: int = 96) -> list[np.ndarray]:
    """A bright bar sweeping left to right across a dark, noisy room: n RGB uint8 frames [h, w, 3]."""
    frames = np.full((n, h, w, 3), rng.uniform(0, 40), np.float32) + rng.normal(0, 4, (n, h, w, 3))
    width, color, x0 = int(rng.integers(8, 14)), rng.uniform(200, 255, 3), rng.uniform(0, 0.3 * w)
    for t in range(n):
        x = int(x0 + t * 0.6 * w / n)
        frames[t, :, x : x + width] = color
    return list(np.clip(frames, 0, 255).astype(np.uint8))


def checker(rng: np.random.Generator, n: int = T, h: int = 72, w: int = 96) -> list[np.ndarray]:
    """A still, mid-grey checkerboard with sensor noise: n RGB uint8 frames [h, w, 3]."""
    cell, a, b = int(rng.integers(4, 9)), rng.uniform(90, 140, 3), rng.uniform(150, 220, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    board = np.where((((yy // cell) + (xx // cell)) % 2 == 0)[..., None], a, b)
    frames = np.stack([board + rng.normal(0, 4, board.shape) for _ in range(n)])
    return list(np.clip(frames, 0, 255).astype(np.uint8))


def random_model(num_classes: int = 0, seed: int = 0) -> Hiera:
    torch.manual_seed(seed)
    model = Hiera(get_config(TINY, num_classes=num_classes)).eval()
    if model.head is not None:
        with torch.no_grad():
            torch.nn.init.normal_(model.head.projection.weight, std=0.05)
    return model


def test_taught_label_wins_on_new_clips(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "taught.json"
    engine = Engine(random_model(), device="cpu", prototypes_file=str(path))
    assert engine.infer([sweep(rng)])[0].labels == []  # headless, nothing taught yet
    assert engine.teach("new", [sweep(rng) for _ in range(3)]) == 3
    assert engine.teach("other", [checker(rng) for _ in range(3)]) == 3
    assert path.is_file()

    # a fresh engine on the same file knows both labels (they persist), and ranks new clips right
    fresh = Engine(random_model(), device="cpu", prototypes_file=str(path))
    assert fresh.prototypes.names == ["new", "other"]
    for res in fresh.infer([sweep(rng) for _ in range(4)]):
        assert res.labels == ["new", "other"] and res.scores[0] > 0.9
    for res in fresh.infer([checker(rng) for _ in range(4)]):
        assert res.labels == ["other", "new"] and res.scores[0] > 0.9


def test_taught_label_ranks_with_the_head_classes():
    rng = np.random.default_rng(1)
    engine = Engine(random_model(num_classes=3, seed=1), device="cpu", top_k=4)
    engine.teach("new", [sweep(rng) for _ in range(3)])
    for res in engine.infer([sweep(rng) for _ in range(3)]):
        assert res.labels[0] == "new" and sorted(res.labels) == ["class_0", "class_1", "class_2", "new"]
    for res in engine.infer([checker(rng) for _ in range(3)]):  # never taught: a head class wins
        assert res.labels[0] != "new"


def test_a_label_taught_under_a_head_class_name_is_one_entry():
    """Teaching `class_1` (a head class) more examples must not list it twice: its probabilities add up."""
    rng = np.random.default_rng(2)
    engine = Engine(random_model(num_classes=3, seed=1), device="cpu", top_k=5)
    clip = sweep(rng)
    before = engine.infer([clip])[0]
    engine.teach("class_1", [sweep(rng) for _ in range(3)])
    assert engine.labeler.classes == ["class_0", "class_1", "class_2"]
    res = engine.infer([clip])[0]
    assert sorted(res.labels) == ["class_0", "class_1", "class_2"] and math.isclose(sum(res.scores), 1.0, rel_tol=1e-5)
    assert res.labels[0] == "class_1" and res.scores[0] > dict(zip(before.labels, before.scores))["class_1"]


def test_frames_that_are_not_uint8_are_refused():
    engine = Engine(random_model(num_classes=3), device="cpu")
    frames = [f.astype(np.float32) / 255 for f in sweep(np.random.default_rng(0))]  # [0, 1] floats would read black
    with pytest.raises(ValueError, match="frames must be uint8 RGB, got float32"):
        engine.infer([frames])


def _data_folder(root, rng) -> tuple:
    ext = dataset.video_format()[0]
    rows = []
    for i in range(2):
        for label, make in (("sweep", sweep), ("board", checker)):
            name = f"{label}{i}{ext}"
            dataset.write_video(root / name, np.stack(make(rng, n=16)), fps=8.0)  # 2 s: a clip at any stride here
            rows.append((name, label))
    dataset.write_labels_csv(root, rows + [(rows[0][0], None)])  # an unlabeled row is skipped
    return rows


def test_teach_cli_writes_prototypes_beside_the_model(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    data.mkdir()
    _data_folder(data, rng)
    model_path = save_checkpoint(tmp_path / "robot.pt", random_model(), model_id="robot",
                                 extra={"sampling": {"frame_stride_s": 1 / 8}})
    args = ["teach", "--model", str(model_path), "--data", str(data), "--device", "cpu", "--clips-per-video", "1"]
    assert cli.main(args + ["--label", "sweep"]) == 0
    proto_file = prototypes_path(model_path)
    assert proto_file == tmp_path / "robot.pt.prototypes.json" and proto_file.is_file()
    assert {n: r["count"] for n, r in json.loads(proto_file.read_text())["labels"].items()} == {"sweep": 2}
    assert cli.main(args) == 0  # every label of the folder; sweep is reinforced
    counts = {n: r["count"] for n, r in json.loads(proto_file.read_text())["labels"].items()}
    assert counts == {"sweep": 4, "board": 2}

    engine = Engine(str(model_path), device="cpu")  # the model's file finds its taught labels
    assert engine.prototypes.path == proto_file
    assert engine.infer([sweep(rng)])[0].labels[0] == "sweep"
    assert engine.infer([checker(rng)])[0].labels[0] == "board"


def test_teach_says_when_a_new_label_competes_with_a_class_and_forget_undoes_it(tmp_path, capsys):
    # A user taught "retreat" from clips the embedded model names "idle": the new prototype took over idle's clips,
    # silently. teach now says so, --list shows what is taught and --forget takes a label back.
    from hiera_perception.checkpoint import DEFAULT_MODEL, MODELS_DIR
    from hiera_perception.synth import render_clip

    if not (MODELS_DIR / DEFAULT_MODEL).is_file():
        pytest.skip("the embedded model is not built yet")
    data, protos = tmp_path / "data", tmp_path / "taught.json"
    data.mkdir()
    ext = dataset.video_format()[0]
    for i in range(2):
        dataset.write_video(data / f"r{i}{ext}", render_clip("idle", np.random.default_rng([7, i]), 45, (96, 128)),
                            fps=15.0)
    dataset.write_labels_csv(data, [(f"r{i}{ext}", "retreat") for i in range(2)])
    base = ["teach", "--device", "cpu", "--prototypes", str(protos)]
    assert cli.main(base + ["--data", str(data), "--clips-per-video", "1"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"note: the model named [12] of 2 of these clips 'idle' \(p >= 0.5\) before: clips of 'idle' "
                     r"may now be named 'retreat'; check with `eval`, undo with `teach --forget retreat`", err), err
    assert cli.main(base + ["--list"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"1 taught labels in {protos}", "  retreat: 2 clips"]
    assert cli.main(base + ["--forget", "retreat"]) == 0
    assert "forgot 'retreat'" in capsys.readouterr().out
    assert json.loads(protos.read_text())["labels"] == {}
    with pytest.raises(SystemExit, match="no taught label 'retreat' .*taught: none"):
        cli.main(base + ["--forget", "retreat"])


def test_teach_cli_without_a_model_file_needs_a_prototypes_path(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _data_folder(data, np.random.default_rng(3))
    with pytest.raises(SystemExit, match="--prototypes"):
        cli.main(["teach", "--model", TINY, "--data", str(data), "--device", "cpu"])
    out = tmp_path / "mine.json"
    assert cli.main(["teach", "--model", TINY, "--data", str(data), "--device", "cpu", "--prototypes", str(out),
                     "--label", "board"]) == 0
    assert list(json.loads(out.read_text())["labels"]) == ["board"]
    with pytest.raises(SystemExit, match="no labelled clips of 'nothing'"):
        cli.main(["teach", "--model", TINY, "--data", str(data), "--device", "cpu", "--prototypes", str(out),
                  "--label", "nothing"])


def test_run_and_eval_read_the_labels_taught_into_a_file_of_ones_own(tmp_path, capsys):
    # teach --prototypes FILE wrote a file that neither run nor eval could be pointed at
    data = tmp_path / "data"
    data.mkdir()
    rows = _data_folder(data, np.random.default_rng(5))
    out = tmp_path / "mine.json"
    model = save_checkpoint(tmp_path / "robot.pt", random_model(), model_id="robot",  # headless: taught labels only
                            extra={"sampling": {"frame_stride_s": 1 / 8}})
    base = ["--model", str(model), "--device", "cpu", "--prototypes", str(out)]
    assert cli.main(["teach", *base, "--data", str(data), "--clips-per-video", "1"]) == 0
    assert not prototypes_path(model).exists() and out.is_file()
    capsys.readouterr()
    assert cli.main(["eval", *base, "--data", str(data), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0  # two actions any encoder tells apart
    board = next(name for name, label in rows if label == "board")
    assert cli.main(["run", *base, "--video", str(data / board), "--json", "--frame-stride", "0.125"]) == 0
    clips = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert clips and all(c["labels"][0] == "board" for c in clips)


def test_rival_is_a_confident_majority_among_three_or_more_classes():
    from hiera_perception.labeler import rival

    eight = ["wave", "idle", "approach", "circle", "swipe_left", "swipe_right", "swipe_up", "swipe_down"]
    assert rival("retreat", [("idle", 0.9), ("idle", 0.7), ("wave", 0.9)], eight) == (
        "the model named 2 of 3 of these clips 'idle' (p >= 0.5) before: clips of 'idle' may now be named 'retreat'")
    assert rival("retreat", [("idle", 0.9), ("idle", 0.4), ("wave", 0.9)], eight) is None  # 1 confident of 3
    assert rival("idle", [("idle", 0.9)] * 3, eight) is None  # reinforcing a class
    assert rival("retreat", [("idle", 0.9)] * 3, ["idle", "wave"]) is None  # 2 classes: p >= 0.5 is no signal
    assert rival("retreat", [], eight) is None


def test_the_node_teach_job_carries_the_same_note():
    # the node's ~/teach learns clips it served: their served labels say what the model made of them before
    from hiera_perception.online import TeachJob

    job = TeachJob.start("retreat", 1.0, 10.0)
    clip = [np.zeros((4, 4, 3), np.uint8)]
    job.record([clip] * 4, job.until - 0.5, [("idle", 0.8)] * 4)
    job.finish(lambda label, clips: len(clips), "/x/taught.json", ["idle", "wave", "circle", "approach"])
    assert job.success and job.clips_learned == 4 and job.message == (
        "taught 'retreat' from 4 clips (4 in all), saved to /x/taught.json; note: the model named 4 of 4 of these "
        "clips 'idle' (p >= 0.5) before: clips of 'idle' may now be named 'retreat' (undo: hiera-perception teach "
        "--forget retreat --prototypes /x/taught.json)")
