"""fastbert modules under torch.nn.parallel.DistributedDataParallel: two processes on CPU (gloo,
127.0.0.1 only), each on half of the batch, must produce the gradients of one process on the whole
batch (the modules are plain autograd modules with no global state).

The workers are separate Python processes started with a time limit; they exchange nothing but
the gloo all-reduce on the loopback interface and files in pytest's tmp_path (the
rendezvous too: a FileStore, so no port is probed and then raced for).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastbert.nn as fnn

TIMEOUT_S = 120

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, os.environ["FASTBERT_DDP_TESTS"])
    import test_ddp

    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    # rendezvous through a file in tmp_path: no TCP port to probe and then lose to another process
    dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "rendezvous"),
                            rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        model = test_ddp.make_model()
        model.load_state_dict(torch.load(os.path.join(workdir, "init.pt")))
        ddp = DDP(model)
        x, kpm, y = torch.load(os.path.join(workdir, "batch.pt"))
        shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        loss = test_ddp.loss_fn(ddp(x[shard], kpm[shard]), y[shard])
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        torch.save(grads, os.path.join(workdir, f"grads{rank}.pt"))
        dist.barrier()  # both ranks have saved their gradients
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing gloo down: one rank's destroy_process_group can race with the
    # other's and abort it ("terminate called without an active exception", about 1 run in 10).
    sys.stdout.flush()
    os._exit(0)
""")


class Model(nn.Module):
    """Two fastbert encoder layers (fused ops), a block-sparse layer and a LayerNorm + GELU head."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([
            fnn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, activation="gelu",
                                        batch_first=True, norm_first=i == 1, backend="torch")
            for i in range(2)])
        self.sparse = fnn.BlockSparseSelfAttention(16, 4, "sliding_window", block_size=4,
                                                   backend="torch")
        self.norm = fnn.LayerNorm(16, backend="torch")
        self.act = fnn.GELU(backend="torch")
        self.head = nn.Linear(16, 3)

    def forward(self, x, kpm):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=kpm)
        x = x + self.sparse(x, key_padding_mask=kpm)
        return self.head(self.act(self.norm(x)))


def make_model():
    return Model()


def loss_fn(out, y):
    # mean over the shard: DDP averages the ranks' gradients, so the shards must be equal in size
    return nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1))


def test_ddp_two_processes_match_single_process(tmp_path):
    torch.manual_seed(0)
    model = make_model()
    torch.save(model.state_dict(), tmp_path / "init.pt")
    x = torch.randn(4, 10, 16)
    kpm = torch.zeros(4, 10, dtype=torch.bool)
    kpm[1, 7:] = True
    kpm[3, 4:] = True
    y = torch.randint(0, 3, (4, 10))
    torch.save((x, kpm, y), tmp_path / "batch.pt")

    # single process, whole batch: the mean of the two half-batch losses
    half = x.shape[0] // 2
    loss = 0.5 * (loss_fn(model(x[:half], kpm[:half]), y[:half])
                  + loss_fn(model(x[half:], kpm[half:]), y[half:]))
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, FASTBERT_DDP_TESTS=os.path.dirname(os.path.abspath(__file__)),
               OMP_NUM_THREADS="1", FASTBERT_BACKEND="torch")
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), "2", str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-3000:]}"

    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        assert set(grads) == set(expected)
        for name, g in expected.items():
            assert grads[name] is not None, f"rank {rank}: {name} has no gradient"
            assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), (
                f"rank {rank}: {name}: max diff {(grads[name] - g).abs().max():.3e}")
