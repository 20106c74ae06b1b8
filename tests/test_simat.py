"""The SIMAT scorer on generated miniature databases in the benchmark's file layout."""

import math

import open_clip
import pytest
import torch
from PIL import Image

from m2mix_openclip.analyze import main as analyze_main
from m2mix_openclip.demo import write_local_model
from m2mix_openclip.retrieval import embedding_arithmetic
from m2mix_openclip.simat import DEFAULT_SCALES, load_simat, simat_evaluate, simat_scores


def write_db(folder, regions, transfos, similarity, image_colours=None):
    """regions: region ids in dataset_id order; transfos: (region, value, target, target_ids, norm2, is_test)."""
    (folder / "images" / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for region in regions:
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "images" / "images" / f"{region}.png")
    # the benchmark's column order, with its unnamed index column first
    (folder / "triplets.csv").write_text("region_id,subj,rel,obj,dataset_id\n" + "".join(
        f"{region},cat,on,mat,{k}\n" for k, region in reversed(list(enumerate(regions)))))
    (folder / "transfos.csv").write_text(
        ",transfo_id,region_id,field,value,target,norm,query_ids,target_ids,dataset_id,norm2,is_test\n" + "".join(
            f"{i},{i},{r},obj,{v},{t},1,0,{tid},{regions.index(r)},{n2},{test}\n"
            for i, (r, v, t, tid, n2, test) in enumerate(transfos)))
    torch.save(similarity, folder / "oscar_similarity_matrix.pt")
    return str(folder)


def test_protocol_by_hand(tmp_path):
    # four images e0..e3 (dataset ids 0..3); words: cat = e0, dog = e2, sun = e3
    regions = [501, 77, 12, 940]
    sim = torch.zeros(4, 3)
    sim[2, 0] = 0.9   # image 2 shows caption 0
    sim[3, 1] = 0.5   # image 3 "shows" caption 1 at exactly the threshold: not a success
    sim[1, 2] = 0.99  # image 1 would succeed for caption 2, but only the test split asks for it
    folder = write_db(tmp_path, regions, [
        (501, "cat", "dog", 0, 4, "False"),   # e0 -> e2, judged by caption 0: success, weight 1/2
        (501, "cat", "sun", 1, 1, "False"),   # e0 -> e3, caption 1 at 0.5: failure, weight 1
        (12, "dog", "cat", 2, 9, "True"),     # test split only
    ], sim)
    data = load_simat(folder)
    e = torch.eye(4, 8)
    words = {"cat": e[0], "dog": e[2], "sun": e[3]}
    dev = simat_scores(e, words, data, "dev", scales=[0.25, 1.0])
    # at 0.25 the query is nearest to its own image, which is skipped: the next one is e2 / e3 all the same
    assert dev == {0.25: pytest.approx(100 * 0.5 / 1.5), 1.0: pytest.approx(100 * 0.5 / 1.5)}
    # test split: image 2 + (cat - dog) retrieves image 0, which the judge rejects (sim[0, 2] = 0) ...
    assert simat_scores(e, words, data, "test", scales=[1.0]) == {1.0: 0.0}
    sim[0, 2] = 0.51  # ... until it accepts it
    torch.save(sim, tmp_path / "oscar_similarity_matrix.pt")
    assert simat_scores(e, words, load_simat(folder), "test", scales=[1.0]) == {1.0: 100.0}
    with pytest.raises(ValueError, match="'dev' or 'test'"):
        simat_scores(e, words, data, "val")


def plain_simat(x, words, transfos, sim, scale, test):
    """The benchmark's eval.py written out plainly with loops, on (image, word) embeddings."""
    x = [v / v.norm() for v in x]
    total = hits = 0.0
    for region_index, value, target, target_id, norm2, is_test in transfos:
        if (is_test == "True") != test:
            continue
        query = x[region_index] + scale * (words[target] / words[target].norm() - words[value] / words[value].norm())
        order = sorted(range(len(x)), key=lambda i: -float(query @ x[i]))
        retrieved = order[0] if order[0] != region_index else order[1]
        w = 1 / math.sqrt(norm2)
        total += w
        hits += w * (float(sim[retrieved, target_id]) > 0.5)
    return 100 * hits / total


def test_tiny_model_on_a_miniature_database_equals_the_plain_protocol(tmp_path):
    regions = list(range(1000, 1012))
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(12, 6, generator=g)
    vocab = ["cat", "dog", "red", "blue", "table", "chair"]
    transfos = [(regions[int(torch.randint(0, 12, (1,), generator=g))], vocab[a], vocab[b], c, float(n), t)
                for a, b, c, n, t in [(0, 1, 0, 4, "False"), (1, 0, 1, 9, "False"), (2, 3, 2, 1, "False"),
                                      (3, 2, 3, 16, "False"), (4, 5, 4, 2, "True"), (5, 4, 5, 3, "False"),
                                      (0, 2, 5, 5, "False"), (3, 5, 1, 7, "True")]]
    folder = write_db(tmp_path, regions, transfos, sim)
    model_name = write_local_model(str(tmp_path / "model"))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    scales = [0.5, 1.0, 3.0]
    got = simat_evaluate(model, preprocess, tokenizer, folder, "dev", scales, progress=False)
    with torch.no_grad():
        x = model.encode_image(torch.stack([preprocess(Image.open(tmp_path / "images" / "images" / f"{r}.png"))
                                            for r in regions]))
        words = {w: model.encode_text(tokenizer([w]))[0] for w in vocab}
    plain_rows = [(regions.index(r), v, t, c, n, test) for r, v, t, c, n, test in transfos]
    want = {s: plain_simat(x, words, plain_rows, sim, s, test=False) for s in scales}
    for s in scales:
        assert got[f"simat_dev@{s:g}"] == pytest.approx(want[s])
    assert got["simat_dev"] == pytest.approx(max(want.values()))
    assert want[got["simat_dev_scale"]] == pytest.approx(max(want.values()))


def test_missing_files_and_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="triplets.csv"):
        load_simat(str(tmp_path))
    folder = write_db(tmp_path / "db", [1, 2], [(1, "a", "b", 0, 1, "False")], torch.zeros(2, 1))
    (tmp_path / "db" / "images" / "images" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match="2.png"):
        load_simat(folder)


def test_embedding_arithmetic_is_stricter_than_simat(tmp_path):
    # the retrieved image is not the listed target, yet the judge accepts it: SIMAT counts a
    # success, exact-target arithmetic does not
    sim = torch.zeros(3, 1)
    sim[2, 0] = 0.8
    folder = write_db(tmp_path, [1, 2, 3], [(1, "cat", "dog", 0, 1, "False")], sim)
    e = torch.eye(3, 4)
    words = {"cat": e[0], "dog": e[2]}
    assert simat_scores(e, words, load_simat(folder), "dev", [1.0]) == {1.0: 100.0}
    exact = embedding_arithmetic(e[:1], words["cat"][None], words["dog"][None], e, torch.tensor([1]),
                                 torch.tensor([0]), scale=1.0)
    assert exact["arithmetic_R@1"] == 0.0


def test_analyze_simat_db_flag(tmp_path):
    regions = [10, 11, 12]
    sim = torch.rand(3, 2, generator=torch.Generator().manual_seed(2))
    folder = write_db(tmp_path / "db", regions, [(10, "cat", "dog", 0, 1, "False"), (11, "dog", "cat", 1, 4, "False")],
                      sim)
    model_name = write_local_model(str(tmp_path / "model"))
    (tmp_path / "d.csv").write_text("filepath\ttitle\n" + "".join(
        f"{tmp_path / 'db' / 'images' / 'images' / f'{r}.png'}\tpicture {r}\n" for r in regions))
    assert analyze_main(["--model", model_name, "--data", str(tmp_path / "d.csv"), "--simat-db", folder,
                         "--simat-scales", "1", "2", "--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    import json
    row = json.loads((tmp_path / "r" / "analysis.json").read_text())["models"]["model"]  # the folder's name
    assert set(row) >= {"simat_dev", "simat_dev_scale", "simat_dev@1", "simat_dev@2"}
    assert row["simat_dev"] == max(row["simat_dev@1"], row["simat_dev@2"])
    assert analyze_main(["--model", model_name, "--data", str(tmp_path / "d.csv"), "--simat-db",
                         str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 2


def test_default_scales_are_the_m2mix_reference_list():
    from m2mix_openclip.analyze import build_parser
    # changdaeoh/multimodal-mixup, main.py, SIMAT_eval: `for lbd in [0.5,1,1.5,2,2.5,3,3.5,4,4.5,5,5.5,6,7]`
    assert list(DEFAULT_SCALES) == [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7]
    args = build_parser().parse_args(["--model", "m", "--data", "d.csv", "--out", "o"])
    assert args.simat_scales == list(DEFAULT_SCALES)
