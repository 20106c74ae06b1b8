"""m2mix-wiseft: weight-space interpolation, its endpoints and a middle alpha against independent
computations, the records, the best alphas, the figure's layout, and the errors."""

import json
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_plots import layout_problems

from m2mix_openclip.data import CLASS_NAMES, write_dataset
from m2mix_openclip.datasets import load_labelled_set
from m2mix_openclip.demo import write_local_model
from m2mix_openclip.integration.openclip_compat import model_name as openclip_name  # local-dir: before 3.0 too
from m2mix_openclip.models import interpolate_state_dicts, load_model
from m2mix_openclip.plots import plot_weight_interpolation
from m2mix_openclip.wiseft import RECORD_KEYS, best_alphas, curve_points, main

TEMPLATES = ["a handwritten digit {c}", "the number {c}"]
SUBSET = [2, 5, 7]  # the classes of the ImageFolder set


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("wiseft")
    data = write_dataset(str(base / "data"), splits=("test",), limit=20, shifts=("rotate", "blur"))
    model = write_local_model(str(base / "model"))
    checkpoints = {}
    torch.manual_seed(0)
    zero_shot = open_clip.create_model_and_transforms(openclip_name(model))[0]
    for seed, name in ((0, "zeroshot"), (1, "clip"), (2, "m2mix")):
        net = open_clip.create_model_and_transforms(openclip_name(model))[0]
        with torch.no_grad():  # "fine-tuned" models near the zero-shot one, each with a logit scale of its own
            for p, p0 in zip(net.parameters(), zero_shot.parameters()):
                p.copy_(p0 + (0.05 * torch.randn_like(p) if seed else 0))
            net.logit_scale.fill_(float(zero_shot.logit_scale) + seed)
        checkpoints[name] = str(base / f"{name}.pt")
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
                   checkpoints[name])
    # a shifted ImageFolder set of three classes, folders named by class index
    blurred = load_labelled_set("b", data["test-blur"]["csv"], 10)
    for path, label in zip(blurred.images, blurred.labels.tolist()):
        if label in SUBSET:
            os.makedirs(base / "folder" / str(label), exist_ok=True)
            os.link(path, base / "folder" / str(label) / os.path.basename(path))
    out = base / "out"
    argv = ["--model", model, "--checkpoint", checkpoints["zeroshot"], "--finetuned", checkpoints["clip"],
            checkpoints["m2mix"], "--labels", "clip", "m2mix", "--id", f"clean={data['test']['csv']}",
            "--ood", f"rot={data['test-rotate']['shards']}", "--ood", f"blur3={base / 'folder'}",
            "--classnames", ",".join(CLASS_NAMES), "--templates", ";".join(TEMPLATES), "--device", "cpu",
            "--out", str(out)]
    return {"base": base, "data": data, "model": model, "checkpoints": checkpoints, "argv": argv, "out": out}


@pytest.fixture(scope="module")
def run(env):
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(env["argv"]) == 0
    return json.loads((env["out"] / "wiseft.json").read_text()), printed.getvalue()


def state(checkpoint):
    return {k.removeprefix("module."): v for k, v in
            torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"].items()}


def plain_ece(confidence, correct, bins=15):
    """ECE written plainly: bins (b/15, (b+1)/15], the first one closed at 0."""
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidence) if (low < c <= high) or (b == 0 and c == 0)]
        if members:
            gap = sum(correct[i] - confidence[i] for i in members)
            total += abs(gap)
    return total / len(confidence)


def independent_scores(model_name, weights, images, labels, classes=None):
    """Zero-shot top-1, top-5 and ECE, one image and one prompt at a time, from open_clip directly;
    ``classes``: the set's own classes (logits restricted to them, labels their positions)."""
    model_name = openclip_name(model_name)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.load_state_dict(weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    hits, hits5, confidence, correct = 0, 0, [], []
    with torch.no_grad():
        classifier = torch.stack([
            F.normalize(torch.stack([F.normalize(model.encode_text(tokenizer([t.replace("{c}", c)])), dim=-1)[0]
                                     for t in TEMPLATES]).mean(0), dim=0) for c in CLASS_NAMES])
        if classes is not None:
            classifier = classifier[classes]
        scale = float(model.logit_scale.exp())
        for image, label in zip(images, labels):
            opened = Image.open(image if isinstance(image, str) else __import__("io").BytesIO(image)).convert("RGB")
            x = F.normalize(model.encode_image(preprocess(opened)[None]), dim=-1)[0]
            logits = classifier @ x
            hits += int(int(logits.argmax()) == label)
            if len(classifier) >= 5:
                hits5 += int(label in logits.topk(5).indices.tolist())
            probs = (scale * logits).softmax(0)
            confidence.append(float(probs.max()))
            correct.append(int(int(probs.argmax()) == label))
    n = len(labels)
    return {"top1": hits / n, "top5": hits5 / n if len(classifier) >= 5 else None,
            "ece": plain_ece(confidence, correct)}


def the_sets(env):
    d = env["data"]
    clean = load_labelled_set("clean", d["test"]["csv"], 10)
    rot = load_labelled_set("rot", d["test-rotate"]["shards"], 10)
    files = sorted((int(label), os.path.join(env["base"], "folder", label, f))
                   for label in os.listdir(env["base"] / "folder") for f in os.listdir(env["base"] / "folder" / label))
    blur = ([p for _, p in files], [SUBSET.index(label) for label, _ in files])
    return {"clean": (clean.images, clean.labels.tolist(), None), "rot": (rot.images, rot.labels.tolist(), None),
            "blur3": (*blur, SUBSET)}


def test_records_one_per_model_alpha_and_set(run):
    records, _ = run
    assert all(tuple(r) == RECORD_KEYS for r in records)
    alphas = [i / 10 for i in range(11)]
    assert [(r["model"], r["alpha"], r["set"], r["split"]) for r in records] == [
        (m, a, s, split) for m in ("clip", "m2mix") for a in alphas
        for s, split in (("clean", "id"), ("rot", "ood"), ("blur3", "ood"))]
    zero = [{k: r[k] for k in ("set", "top1", "top5", "ece")} for r in records if r["alpha"] == 0]
    assert zero[:3] == zero[3:]  # the shared zero-shot point, scored once
    assert all(r["top5"] is None for r in records if r["set"] == "blur3")  # three classes: no top-5


@pytest.mark.parametrize("alpha,model", [(0.0, "clip"), (1.0, "clip"), (1.0, "m2mix"), (0.5, "m2mix")])
def test_endpoints_and_a_middle_alpha_against_an_independent_computation(env, run, alpha, model):
    records, _ = run
    theta0, theta1 = state(env["checkpoints"]["zeroshot"]), state(env["checkpoints"][model])
    # the weights by hand: (1 - a) theta0 + a theta1 for every tensor (all are floats here)
    by_hand = {k: (1 - alpha) * theta0[k] + alpha * theta1[k] for k in theta0}
    merged = interpolate_state_dicts(theta0, theta1, alpha)
    for k in theta0:
        assert torch.allclose(merged[k], by_hand[k], rtol=1e-6, atol=1e-7), k
        if alpha in (0.0, 1.0):  # exactly the zero-shot or the fine-tuned weights
            assert torch.equal(merged[k], theta0[k] if alpha == 0 else theta1[k]), k
    for name, (images, labels, classes) in the_sets(env).items():
        expected = independent_scores(env["model"], by_hand, images, labels, classes)
        got = next(r for r in records if (r["model"], r["alpha"], r["set"]) == (model, alpha, name))
        assert got["top1"] == pytest.approx(expected["top1"], abs=1e-6), name
        assert got["top5"] == (None if expected["top5"] is None else pytest.approx(expected["top5"], abs=1e-6))
        assert got["ece"] == pytest.approx(expected["ece"], abs=1e-5), name


def test_the_predictions_at_alpha_0_and_1_are_the_models_own(env):
    """Logits of the interpolated model at the endpoints equal those of each checkpoint loaded alone."""
    from m2mix_openclip.encode import zero_shot_classifier, zero_shot_logits
    images = the_sets(env)["clean"][0]
    model, preprocess, tokenizer = load_model(env["model"], env["checkpoints"]["zeroshot"])
    theta0, theta1 = {k: v.clone() for k, v in model.state_dict().items()}, state(env["checkpoints"]["clip"])

    def logits(weights):
        model.load_state_dict(weights)
        return zero_shot_logits(model, preprocess, images, zero_shot_classifier(model, tokenizer, CLASS_NAMES,
                                                                                TEMPLATES))
    zero, one = logits(theta0), logits(theta1)
    assert torch.allclose(logits(interpolate_state_dicts(theta0, theta1, 0.0)), zero, atol=1e-6, rtol=0)
    assert torch.allclose(logits(interpolate_state_dicts(theta0, theta1, 1.0)), one, atol=1e-6, rtol=0)
    assert not torch.allclose(zero, one, atol=1e-3)  # the two models differ: the check could fail


def test_interpolation_of_every_float_and_the_finetuned_integer_buffers():
    zero = {"w": torch.tensor([1.0, 2.0]), "half": torch.tensor([1.0], dtype=torch.float16),
            "logit_scale": torch.tensor(4.6052), "num_batches_tracked": torch.tensor(5)}
    tuned = {"w": torch.tensor([3.0, -2.0]), "half": torch.tensor([2.0], dtype=torch.float16),
             "logit_scale": torch.tensor(2.0), "num_batches_tracked": torch.tensor(9)}
    merged = interpolate_state_dicts(zero, tuned, 0.25)
    assert torch.allclose(merged["w"], torch.tensor([1.5, 1.0]))
    assert merged["logit_scale"].item() == pytest.approx(0.75 * 4.6052 + 0.25 * 2.0, rel=1e-6)
    assert merged["half"].dtype == torch.float16 and merged["half"].item() == 1.25
    assert merged["num_batches_tracked"].item() == 9  # not a float: the fine-tuned model's
    with pytest.raises(ValueError, match=r"only in the fine-tuned model: extra.*shapes differ: w"):
        interpolate_state_dicts(zero, {**tuned, "w": torch.zeros(3), "extra": torch.zeros(1)}, 0.5)


def test_best_alphas_table_and_figure(env, run, tmp_path):
    records, printed = run
    means = {}
    for r in records:
        means.setdefault((r["model"], r["alpha"]), {"id": [], "ood": []})[r["split"]].append(r["top1"])
    for model in ("clip", "m2mix"):
        alphas = sorted(a for m, a in means if m == model)
        for split, words in (("id", "in-distribution"), ("ood", "shifted")):
            score = {a: sum(means[(model, a)][split]) / len(means[(model, a)][split]) for a in alphas}
            best = min(a for a in alphas if score[a] == max(score.values()))  # ties: the smaller alpha
            assert best_alphas(records)[model][split] == best
            line = next(line for line in printed.splitlines() if line.startswith(f"best alpha by {words} top-1"))
            assert f"{model} alpha {best:g} " in line
    folder_images = sum(len(os.listdir(env["base"] / "folder" / str(c))) for c in SUBSET)
    assert f"  blur3 (ood): {folder_images} images, 3 of 10 classes (its folders), " in printed
    assert "  clean (id): 20 images, 10 classes, " in printed
    assert os.path.isfile(env["out"] / "wiseft.png")
    fig = plot_weight_interpolation(curve_points(records), str(tmp_path / "w.png"), "clean", "rot, blur3",
                                    best_alphas(records))
    assert layout_problems(fig) == []
    ax = fig.axes[0]
    assert ax.get_xlabel() == "in-distribution top-1 (clean)" and "shifted sets (rot, blur3)" in ax.get_ylabel()
    assert [t.get_text() for t in fig.legends[0].texts] == [
        "zero-shot model (\u03b1 = 0)", "clip: \u03b1 from 0 to 1", "m2mix: \u03b1 from 0 to 1",
        "best \u03b1 in-distribution", "best \u03b1 on the shifted sets"]
    assert any(t.get_visible() and t.get_text() == "1" for t in ax.texts)  # alpha written along the curves


def test_figure_layout_with_crowded_curves(tmp_path):
    """Many models whose points nearly coincide: the alpha labels that would collide are left out."""
    alphas = [i / 10 for i in range(11)]
    curves = {name: [(a, 0.5 + 0.01 * a * (k + 1), 0.4 + 0.001 * a) for a in alphas]
              for k, name in enumerate(["clip", "m2mix", "finetuned-m2mix/checkpoints/epoch_10.pt"])}
    fig = plot_weight_interpolation(curves, str(tmp_path / "c.png"), "imagenet", "v2, r, sketch, a, objectnet",
                                    {"clip": {"id": 1.0, "ood": 0.5}})
    assert layout_problems(fig) == []


@pytest.mark.parametrize("case", ["no zero-shot weights", "labels", "missing", "wrong model", "alpha", "same name"])
def test_errors_are_one_line(env, case, tmp_path, capsys):
    argv = list(env["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path / "o")
    if case == "no zero-shot weights":
        i = argv.index("--checkpoint")
        del argv[i:i + 2]
        message = "the zero-shot model needs --pretrained TAG or --checkpoint FILE"
    elif case == "labels":
        argv[argv.index("--labels") + 2] = "clip"
        message = "--labels must be unique"
    elif case == "missing":
        argv[argv.index("--finetuned") + 1] = str(tmp_path / "gone.pt")
        message = f"--finetuned checkpoint not found: {tmp_path / 'gone.pt'}"
    elif case == "wrong model":
        other = write_local_model(str(tmp_path / "other"), {
            "model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                          "head_width": 32},
                          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1,
                                       "layers": 1}}, "preprocess_cfg": {}})
        torch.save(open_clip.create_model_and_transforms(openclip_name(other))[0].state_dict(), tmp_path / "other.pt")
        argv[argv.index("--finetuned") + 2] = str(tmp_path / "other.pt")
        message = f"checkpoint {tmp_path / 'other.pt'} does not fit model"
    elif case == "alpha":
        argv += ["--alphas", "0", "1.5"]
        message = "alpha 1.5 lies outside [0, 1]"
    else:
        argv[argv.index("--ood") + 1] = "clean=" + env["data"]["test-rotate"]["csv"]
        message = "['clean'] appear twice"
    if case == "alpha":
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and (case == "alpha" or err.startswith("m2mix-wiseft: error: "))
    assert not os.path.exists(tmp_path / "o" / "wiseft.json")


def test_images_decoded_by_workers_embed_alike(env):
    from m2mix_openclip.encode import encode_images
    model, preprocess, _ = load_model(env["model"], env["checkpoints"]["clip"])
    images = the_sets(env)["rot"][0]  # shard bytes
    alone = encode_images(model, preprocess, images, 8, progress=False)
    assert torch.equal(encode_images(model, preprocess, images, 8, progress=False, workers=2), alone)


def test_without_out_the_table_is_printed_only(env, tmp_path, capsys):
    argv = [a for a in env["argv"]]
    i = argv.index("--out")
    del argv[i:i + 2]
    assert main(argv + ["--alphas", "0", "1"]) == 0
    printed = capsys.readouterr().out
    assert "best alpha by shifted top-1: clip alpha" in printed and "(--out DIR writes wiseft.json" in printed
    assert main(argv + ["--save-checkpoints"]) == 2
    assert "--save-checkpoints writes into --out" in capsys.readouterr().err


def test_save_checkpoints_writes_each_interpolated_model(env, tmp_path):
    argv = list(env["argv"])
    argv[argv.index("--out") + 1] = str(tmp_path / "o")
    assert main(argv + ["--alphas", "0", "0.5", "--labels", "clip", "m/2", "--save-checkpoints"]) == 0
    saved = sorted(os.listdir(tmp_path / "o" / "checkpoints"))
    assert saved == ["clip-alpha0.00.pt", "clip-alpha0.50.pt", "m_2-alpha0.00.pt", "m_2-alpha0.50.pt"]
    half = torch.load(tmp_path / "o" / "checkpoints" / "m_2-alpha0.50.pt", weights_only=True)
    theta0, theta1 = state(env["checkpoints"]["zeroshot"]), state(env["checkpoints"]["m2mix"])
    assert all(torch.allclose(half[k], 0.5 * theta0[k] + 0.5 * theta1[k], atol=1e-7) for k in theta0)
