import os
import signal
import subprocess
import time

import pytest
import torch

import spp

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the CLI, torchrun, a kill-and-resume, a demo, a benchmark script or a "
                                       "tour in a subprocess (make test runs them; pytest -m 'not slow' skips them)")


TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def tiny_vit(name="vit_tiny_patch16_224", seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    model = spp.create_model(name, **kwargs)
    # timm initialises some tensors to zero (biases, tokens); randomise everything so a
    # slicing error cannot hide behind a zero.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def vit():
    return tiny_vit()


def random_masks(model, granularity, keep=0.6, seed=0, binary=True):
    from spp.models import model_geometry
    from spp.structure import mask_names
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for geom in model_geometry(model):
        n_attn = geom.mask_shape(granularity)
        for pair, name in mask_names(geom).items():
            size = geom.mlp_hidden if pair == "mlp" else n_attn
            m = (torch.rand(size, generator=g) < keep).float()
            if not binary:
                m = m * torch.rand(size, generator=g) * 2
            masks[name] = m
    return masks


SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


def tiny_swin(seed=0, **overrides):
    """Two stages (patch merging between), window 4, shifted windows in every second block."""
    torch.manual_seed(seed)
    model = spp.create_model("swin_tiny_patch4_window7_224", **{**SWIN, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def write_idx(path, tensor):
    """A gzipped IDX file, the format Fashion-MNIST ships in."""
    import gzip
    header = bytes([0, 0, 8, tensor.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.numpy().tobytes())


def fake_fashion_mnist(root, train=1000):
    """spp's synthetic images (class patterns plus noise) in Fashion-MNIST's files (28x28, 10 classes; the test
    split a quarter of ``train``), so no test needs the Debian package."""
    from spp.config import DataConfig
    from spp.data import _synthetic

    cfg = DataConfig(dataset="synthetic", img_size=28, in_chans=1, num_classes=10, synthetic_size=train)
    for split, name in (("train", "train"), ("test", "t10k")):
        data = _synthetic(cfg, split, seed=0)
        write_idx(os.path.join(root, f"{name}-images-idx3-ubyte.gz"), data.images[:, 0])
        write_idx(os.path.join(root, f"{name}-labels-idx1-ubyte.gz"), data.labels.to(torch.uint8))


def check_costs(masked, small):
    """A compressed model's parameters equal its geometry's closed form; FLOPs within 2% of torch.utils.flop_counter."""
    from spp.models import model_geometry
    geoms = model_geometry(masked)
    dense_params, dense_flops = spp.count_params(masked), spp.count_flops(masked)
    params = dense_params + sum(g.params(w) - g.params(g.full) for g, w in zip(geoms, small.spp_widths))
    flops = dense_flops + sum(g.flops(w) - g.flops(g.full) for g, w in zip(geoms, small.spp_widths))
    assert spp.count_params(small) == params
    assert abs(spp.count_flops(small) - flops) <= 0.02 * flops



def _descendants(pid: int) -> list:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own: killing the
    launcher's process group leaves them running)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_after_checkpoint(cmd, checkpoint, total, env=None):
    """Start ``cmd``, SIGKILL it and every process it started once ``checkpoint`` exists; return the step the
    checkpoint holds (asserted part-way: a run that finished first would make a resume test vacuous)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.isfile(checkpoint) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < killed_at < total, "the run must be killed part-way for this test to mean anything"
    return killed_at
