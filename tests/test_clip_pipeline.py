"""CLIP's loss, metrics and data, and the commands on a CLIP model: a tiny random CLIP with the demo's caption
tokenizer, on fake Fashion-MNIST files (captions from class names) and on a Karpathy-split JSON with its images."""
import json
import os
import subprocess
import sys

import pytest
import torch

import spp
from spp import contrastive
from spp.config import load_config
from spp.data import caption_datasets, karpathy_pairs

from helpers import fake_fashion_mnist

transformers = pytest.importorskip("transformers", reason="CLIP needs transformers: pip install -e '.[llm]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_clip_search.yaml")


def test_contrastive_loss_is_transformers_clip_loss_and_counts_every_matching_caption():
    from transformers.models.clip import modeling_clip

    clip_loss = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss   # 5.x, 4.x
    logits = torch.randn(6, 6) * 3
    assert torch.allclose(contrastive.contrastive_loss(logits), clip_loss(logits.t()), atol=1e-6)
    assert torch.allclose(contrastive.contrastive_loss(logits, torch.arange(6)), clip_loss(logits.t()), atol=1e-6)
    # captions 0 and 1 match both images 0 and 1: each image's target is half on each
    match = torch.tensor([7, 7, 1, 2, 3, 4])
    p = torch.eye(6)
    p[:2, :2] = 0.5
    expected = (-(p * logits.log_softmax(1)).sum(1).mean() - (p * logits.t().log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(contrastive.contrastive_loss(logits, match), expected, atol=1e-6)
    assert contrastive.similarity_distillation(logits, logits).abs() < 1e-6
    assert contrastive.similarity_distillation(logits, logits.flip(0)) > 0.1


def test_retrieval_recall_on_a_worked_example():
    """Three images (one shown twice), four captions; image 2's caption is the nearest to image 1 only."""
    images = torch.eye(4)[[0, 0, 1, 2]]                        # rows 0 and 1: the same image (id 10)
    texts = torch.tensor([[1., 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0.9, 0.5, 0]])
    texts = torch.nn.functional.normalize(texts, dim=1)
    image_id = torch.tensor([10, 10, 11, 12])
    r = contrastive.retrieval_recall(images, texts, image_id, image_id, ks=(1, 2))
    # i2t: image 10's nearest caption is its own; 11's nearest is caption 2 (its own); 12's nearest is caption 3
    assert r["i2t@1"] == 100.0
    # t2i over the 3 distinct images: captions 0, 1, 2 find theirs first; caption 3 (of image 12) finds image 11 first
    assert r["t2i@1"] == 75.0 and r["t2i@2"] == 100.0
    assert r["recall@1"] == pytest.approx(87.5)


def test_karpathy_json_reads_splits_and_names_missing_paths(tmp_path):
    from PIL import Image

    images = tmp_path / "images" / "val2014"
    images.mkdir(parents=True)
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        Image.new("RGB", (40, 30), (60 * i, 20, 90)).save(images / f"im{i}.jpg")
        entries.append({"filepath": "val2014", "filename": f"im{i}.jpg", "split": split, "imgid": i,
                        "sentences": [{"raw": f"a photo number {i} "}, {"raw": "another caption"}]})
    json_path = tmp_path / "dataset_coco.json"
    json_path.write_text(json.dumps({"images": entries}))
    train = karpathy_pairs(str(json_path), "train")
    assert [p["image_id"] for p in train] == [0, 0, 1, 1]        # restval trains, as in COCO's Karpathy split
    assert train[0] == {"file": "val2014/im0.jpg", "caption": "a photo number 0", "image_id": 0}
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        karpathy_pairs(str(tmp_path / "nowhere.json"), "train")
    from spp.config import DataConfig
    from spp.demo_clip import caption_tokenizer
    cfg = DataConfig(dataset="captions", root=str(json_path), images=str(tmp_path / "images"), img_size=32, seq_len=12,
                     workers=0)
    data = caption_datasets(cfg, caption_tokenizer(), 0, ["train", "test"])
    assert len(data["train"]) == 4 and len(data["test"]) == 2
    image, info = data["test"][1]
    assert image.shape == (3, 32, 32) and info["target"].tolist() == [3, 3, -1]
    ids = info["input_ids"][info["attention_mask"].bool()].tolist()
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) == 4            # <bos> another caption <eos>
    cfg.images = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="im0.jpg not found"):
        caption_datasets(cfg, caption_tokenizer(), 0, ["train"])


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP of the demo's shape (28x28 grey images in 7x7 patches) with the demo's tokenizer."""
    from spp.demo_clip import caption_tokenizer

    directory = tmp_path_factory.mktemp("clip") / "model"
    tokenizer = caption_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7, num_channels=1)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    data = directory.parent / "fashion"
    data.mkdir()
    fake_fashion_mnist(str(data), train=600)
    return str(directory), str(data)


def _spp(command, *args):
    result = subprocess.run([sys.executable, "-m", "spp", command, DEMO, *args], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_search_family_export_retrain_eval_on_clip(tiny_clip_dir, tmp_path):
    """The five commands on both towers of a CLIP model: a path over all four layers' masks (the search distilled
    from the dense model), a family table with recall and zero-shot accuracy, an exported member that loads with
    spp, a distilled finetune and an eval."""
    model_dir, data = tiny_clip_dir
    out = tmp_path / "search"
    common = [f"model.name={model_dir}", f"data.root={data}", "data.batch_size=32", "data.eval_batch_size=100",
              "search.calibration_batches=2", "family.max_batches=2", "export.max_batches=2"]
    _spp("search", f"output={out}", "search.steps=12", "search.log_every=4", "search.checkpoint_every=0",
         "search.distill=0.5", *common)   # distilled from the dense model's similarities (the masks at 1)
    path = spp.SolutionPath.load(str(out))
    assert len(path.entries) == 12 and any(name.startswith("text_model") for name in path.entries)
    _spp("family", f"output={out}", "family.targets=[1.0,0.5]", *common)
    rows = json.loads((out / "family_eval.json").read_text())
    assert [r["target"] for r in rows] == [1.0, 0.5] and rows[1]["params_kept"] < 0.75
    for r in rows:
        assert 0 <= r["recall@1"] <= 100 and 0 <= r["zero-shot"] <= 100
    assert (out / "family_eval.png").is_file()
    _spp("export", f"output={out}", "export.remove=0.5", "export.rank=entry", "export.values=binary", *common)
    pruned = spp.load_pruned(str(out / "pruned"))
    assert isinstance(pruned, transformers.CLIPModel)
    assert spp.count_params(pruned) < 0.75 * spp.count_params(transformers.CLIPModel.from_pretrained(model_dir))
    retrain = tmp_path / "retrain"
    _spp("retrain", f"output={retrain}", f"train.source={out / 'pruned'}", "train.steps=4", "train.distill=0.5",
         *common)
    result = json.loads((retrain / "result.json").read_text())
    assert result["steps"] == 4 and 0 <= result["last"]["recall@1"] <= 100
    assert isinstance(spp.load_pruned(str(retrain / "best")), transformers.CLIPModel)
    evaluated = _spp("eval", f"train.source={out / 'pruned'}", *common)
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["params"] == spp.count_params(pruned) and metrics["pairs"] == 150 and metrics["pairs_per_s"] > 0
    assert {"i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10", "zero-shot"} <= set(metrics)


def test_imagefolder_zero_shot_and_config_errors(tiny_clip_dir, tmp_path, monkeypatch):
    """Class names from the folder names (``_`` as a space), its val/ folder when there is one, and the accuracy
    that classifying each image by its nearest class embedding gives."""
    from PIL import Image

    from spp.build import build_model
    from spp.config import ConfigError
    from spp.commands import eval as eval_command
    from spp.commands.eval import imagefolder_zero_shot
    from spp.runtime import setup_runtime
    from spp.text import load_tokenizer

    model_dir, data = tiny_clip_dir
    folder = tmp_path / "zs"
    for c, name in enumerate(["sneaker", "ankle_boot"]):
        (folder / "val" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (28, 28), 60 * c + 30 * i).save(folder / "val" / name / f"{i}.png")
    cfg = load_config(DEMO, [f"model.name={model_dir}", f"data.zero_shot={folder}", "data.templates=['a {}.']"])
    model = _grey(build_model(cfg))
    seen = {}
    real = contrastive.zero_shot_accuracy

    def spy(model, loader, prompts, device=None):
        seen["labels"] = torch.cat([y for _, y in loader]).tolist()
        seen["images"] = torch.cat([x for x, _ in loader])
        seen["prompts"] = prompts
        return real(model, loader, prompts, device)

    monkeypatch.setattr(eval_command, "zero_shot_accuracy", spy)
    accuracy = imagefolder_zero_shot(model, cfg, setup_runtime("cpu", "off", 0))
    tokenizer = load_tokenizer(model_dir)
    assert [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in
            zip(seen["prompts"]["input_ids"][:, 0], seen["prompts"]["attention_mask"][:, 0])] == ["a ankle boot .",
                                                                                                "a sneaker ."]
    assert seen["labels"] == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        predicted = (contrastive.image_embeds(model, seen["images"]) @ contrastive.class_embeddings(model, seen["prompts"]).t()).argmax(1)
    assert accuracy == pytest.approx(100 * (predicted == torch.tensor(seen["labels"])).float().mean().item())
    with pytest.raises(ConfigError, match="CLIP takes image-caption pairs"):
        build_model(load_config(DEMO, [f"model.name={model_dir}", "data.dataset=text"]))


def _grey(model):
    """The zero-shot ImageFolder loader gives RGB images; the tiny model takes one channel: average them first."""
    embeddings = model.vision_model.embeddings
    conv = embeddings.patch_embedding
    rgb = torch.nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, bias=False)
    with torch.no_grad():
        rgb.weight.copy_(conv.weight.repeat(1, 3, 1, 1) / 3)
    embeddings.patch_embedding = rgb
    return model


@pytest.mark.slow
def test_clip_benchmark_runs_end_to_end(tiny_clip_dir, tmp_path):
    """scripts/benchmark_clip.py cut to a few steps: every method meets every budget (within 3% of the prunable
    parameters), the finetuned rows and the dense reference are there, and the table is written."""
    model_dir, data = tiny_clip_dir
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark_clip.py"), "--model", model_dir,
                             "--data-root", data, "--out", str(out), "--seeds", "0", "1", "--batch", "32",
                             "--search-steps", "6", "--lasso-steps", "3", "--calibration-batches", "1",
                             "--finetune-steps", "2", "--val-pairs", "40"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "benchmark_clip.json").read_text())
    assert set(results["runs"]) == {"spp", "magnitude", "random", "taylor", "lasso"}
    dense, prunable = results["dense"]["params"], results["prunable"]
    for method, runs in results["runs"].items():
        assert set(runs) == {"0", "1"}
        for removed in ("0.3", "0.5", "0.7"):
            row = runs["0"][removed]
            assert abs((dense - row["params"]) / prunable - float(removed)) < 0.03, (method, removed, row["params"])
            assert 0 <= row["test"]["zero-shot"] <= 100 and "ft" in row and "ft" not in runs["1"][removed]
    assert "ft" in results["dense"]
    table = (out / "benchmark_clip.md").read_text()
    assert "**no finetuning** (seeds 0, 1)" in table and table.count("| spp |") == 2
    assert (out / "benchmark_clip.png").is_file()


@pytest.mark.slow
def test_clip_launchers_run_the_large_configs_and_name_missing_data(tiny_clip_dir, tmp_path):
    """scripts/clip_search.sh and clip_retrain.sh run spp on the CLIP-Large configs; without the COCO files the
    error names the path to fix (the model is the tiny one: CLIP-Large does not download here)."""
    model_dir, _ = tiny_clip_dir
    for script in ("clip_search.sh", "clip_retrain.sh"):   # retrain with no train.source: the dense model
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), f"model.name={model_dir}",
                                 f"data.root={tmp_path / 'dataset_coco.json'}", f"data.images={tmp_path}",
                                 f"output={tmp_path / 'out'}", "amp=off", "device=cpu", "data.seq_len=16"],
                                capture_output=True, text=True, cwd=str(tmp_path))
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"{tmp_path / 'dataset_coco.json'} not found" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_demo_clip_trains_once_and_prints_the_table(tiny_clip_dir, tmp_path, capsys, monkeypatch):
    """spp demo-clip shrunk: tokenizer + CLIP trained and cached, search, family, export, finetune; the table has
    zero-shot / recall@1 for every member and the exported one finetuned; a second run takes the cached model."""
    import spp.demo_clip as demo
    from spp.cli import main

    _, data = tiny_clip_dir
    monkeypatch.setattr(demo, "VISION", dict(demo.VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2))
    monkeypatch.setattr(demo, "TEXT", dict(demo.TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    monkeypatch.setattr(demo, "STEPS", 10)
    out = str(tmp_path / "demo")
    small = [f"data.root={data}", "data.batch_size=32", "data.eval_batch_size=100", "search.steps=8",
             "search.calibration_batches=2", "family.targets=[1.0,0.5]", "train.steps=3"]
    assert main(["demo-clip", "--output", out, *small]) == 0
    printed = capsys.readouterr().out
    assert "1/5 train a small CLIP" in printed and "pretrained: val recall@1" in printed
    rows = [line.split("|") for line in printed.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 2 and " / " in rows[0][5] and " / " in rows[1][6]   # the exported 50% member, finetuned
    assert os.path.isfile(os.path.join(out, "pretrain", "model", "tokenizer.json"))
    assert main(["demo-clip", "--output", out, *small]) == 0
    assert "pretrained model cached in" in capsys.readouterr().out


@pytest.mark.slow
def test_fsdp2_search_and_retrain_on_clip_match_ddp(tiny_clip_dir, tmp_path):
    """model.fsdp=true on both towers of a CLIP (2 CPU processes, gloo): the logit scale, a scalar FSDP2 cannot
    shard, stays whole on every rank; zero-shot evaluation runs get_text_features on the sharded model. The
    search gives DDP's path; the retrain of a member that lost every query-key dim of one layer (empty
    projections, which FSDP2 cannot shard either) gives DDP's weights, the logit scale trained alike."""
    from spp.models import model_geometry
    from spp.structure import mask_names

    model_dir, data = tiny_clip_dir
    common = [f"model.name={model_dir}", f"data.root={data}", "data.batch_size=32", "data.eval_batch_size=100",
              "search.calibration_batches=2", "search.steps=8", "search.nu=3000", "search.checkpoint_every=0",
              "train.steps=6", "train.epochs=1", "train.ema=false"]
    model = spp.create_model(model_dir)
    spp.add_masks(model)
    g = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(p.shape, generator=g) > 0.3).float() for n, p in spp.mask_parameters(model)}
    emptied = mask_names(model_geometry(model)[-1])["qk"]
    masks[emptied] = torch.zeros_like(masks[emptied])
    spp.set_masks(model, masks)
    member = str(tmp_path / "member")
    spp.save_pruned(spp.compress(model), member)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    for mode in ("ddp", "fsdp"):
        for command in ("search", "retrain"):
            out[mode, command] = tmp_path / f"{mode}-{command}"
            result = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "spp",
                 command, DEMO, f"output={out[mode, command]}", f"train.source={member}", *common,
                 *(["model.fsdp=true"] if mode == "fsdp" else [])],
                capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
            assert result.returncode == 0, result.stderr[-3000:]
            assert ("its weights read by rank 0 only" in result.stdout) == (mode == "fsdp")
    paths = [spp.SolutionPath.load(str(out[mode, "search"])) for mode in ("ddp", "fsdp")]
    for n, e in paths[0].entries.items():
        assert torch.equal(e["entry_step"], paths[1].entries[n]["entry_step"]), n
    ddp, fsdp = (spp.load_pruned(str(out[mode, "retrain"] / "last")).state_dict() for mode in ("ddp", "fsdp"))
    before = spp.load_pruned(member).state_dict()
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ddp["logit_scale"], before["logit_scale"])
