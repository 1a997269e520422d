"""tools/make_embedded_model.py --quick: every stage of the embedded model's build (synth, curriculum, finetune,
MAE decoder, joint, eval) at toy size, chained as the real build chains them; models/ is left alone."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_build_runs_every_stage_and_records_it(tmp_path):
    models = sorted(p.name for p in (ROOT / "models").glob("*"))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "make_embedded_model.py"), "--quick", "--work",
                          str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "hiera_tiny_synthetic.eval.json").read_text())
    names = [s["name"] for s in record["build"]["stages"]]
    assert names == ["synth", "synth_heldout", "curriculum0", "finetune", "decoder", "joint", "eval"]
    commands = {s["name"]: s["command"] for s in record["build"]["stages"]}
    assert "--only-classes swipe_left,swipe_right" in commands["curriculum0"]
    assert "--init $WORK/curriculum0.pt" in commands["finetune"]  # the curriculum's weights go on
    assert "--freeze-encoder" in commands["decoder"] and "--init $WORK/finetuned.pt" in commands["decoder"]
    assert "--mae-weight 3.0" in commands["joint"] and "--init $WORK/decoder.pt" in commands["joint"]
    assert record["eval"]["clips"] == 16 and 0.0 <= record["eval"]["accuracy"] <= 1.0

    from hiera_perception.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "hiera_tiny_synthetic.pt")
    assert any(k.startswith("decoder_") for k in ck.model_state) and len(ck.labels) == 8  # served + adapted
    assert ck.extra["sampling"]["frame_stride_s"] == record["build"]["recipe"]["frame_stride_s"]
    assert sorted(p.name for p in (ROOT / "models").glob("*")) == models, "--quick never touches models/"
