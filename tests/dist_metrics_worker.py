"""Worker for tests/test_metrics_dist.py, started by torchrun with 2 processes (gloo, CPU).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/dist_metrics_worker.py DATA.npz OUT.json

Shards the data unequally between ranks (and gives rank 1 no eval batch at all in one run), runs
`pnc.metrics.measure` through an `accelerate.Accelerator(cpu=True)` and through plain
torch.distributed, and writes the results of rank 0 (plus a check that all ranks agree) as JSON. The "family"
run selects every metric of the registry (matrix metrics as nested lists).
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator

from pnc.metrics import measure


def batches(idx, labels, bs):
    idx = np.ascontiguousarray(idx)
    for i in range(0, len(idx), bs):
        j = torch.as_tensor(idx[i:i + bs])
        yield j, torch.as_tensor(labels[j.numpy()]), j


def main(data_path: str, out_path: str) -> None:
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, world
    d = np.load(data_path)
    feats = {k[5:]: torch.as_tensor(d[k]) for k in d.files if k.startswith("feat_")}
    labels, tr, te = d["labels"], d["train"], d["test"]

    def extract(x):
        return {k: v[x] for k, v in feats.items()}

    cut_tr = int(0.37 * len(tr))  # unequal shards
    cut_te = int(0.8 * len(te))
    my_tr = tr[:cut_tr] if rank == 0 else tr[cut_tr:]
    my_te = te[:cut_te] if rank == 0 else te[cut_te:]
    kw = dict(num_classes=int(d["K"]), label_names=("noisy", "clean"), progress=False)
    results = {}
    r = measure(extract, batches(my_tr, labels, 23), batches(my_te, labels[:, 1:], 19), accelerator=acc, **kw)
    results["ridge_accelerate"] = {"metrics": r.as_dict(), "probe": r.info["probe"], "samples": r.samples}
    # plain torch.distributed, logistic probe, and rank 1 without any eval batch
    my_te2 = te if rank == 0 else te[:0]
    r = measure(extract, batches(my_tr, labels, 31), batches(my_te2, labels[:, 1:], 19), probe="logistic",
                logistic_max_samples=int(d["cap"]), **kw)
    results["logistic_dist"] = {"metrics": r.as_dict(), "probe": r.info["probe"], "samples": r.samples}
    # a DistributedSampler over an odd number of samples pads the shorter shard with a repeated sample; the
    # mask (True for real samples) keeps that duplicate from counting twice
    odd_tr, odd_te = tr[:649], te[:249]

    def padded(idx, bs):
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(range(len(idx)), num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        got = np.asarray(list(sampler))  # padded by repeating the first samples
        where = np.arange(rank, sampler.total_size, world)  # positions in the padded global order
        mine, mask = idx[got], where < len(idx)
        assert sampler.total_size > len(idx) and len(got) == len(where), "the sampler padded"
        for i in range(0, len(mine), bs):
            j = torch.as_tensor(mine[i:i + bs])
            yield j, torch.as_tensor(labels[j.numpy()]), j, torch.as_tensor(mask[i:i + bs])

    def padded_eval(idx, bs):
        for x, y, j, m in padded(idx, bs):
            yield x, y[:, 1:], j, m

    r = measure(extract, padded(odd_tr, 17), padded_eval(odd_te, 13), accelerator=acc, **kw)
    results["padded_masked"] = {"metrics": r.as_dict(), "probe": r.info["probe"], "samples": r.samples}
    # every selectable metric of the registry (the whole family, nc4, cdnv_matrix), a "train" eval split too, the
    # probe as the classifier of two layers and a given one for the third; class K-1 is absent from rank 1's shards
    w = torch.as_tensor(d["head_w"]), torch.as_tensor(d["head_b"])
    r = measure(extract, batches(my_tr, labels, 29), {"test": batches(my_te, labels[:, 1:], 19), "train": batches(my_tr, labels, 41)},
                accelerator=acc, metrics=tuple(str(m) for m in d["family"]), classifiers={"b2": w}, **kw)
    results["family"] = {"metrics": r.as_dict(), "probe": r.info["probe"], "samples": r.samples,
                         "matrices": {k: [m.tolist() for m in v] for k, v in r.matrices.items()},
                         "classifier": r.info["classifier"]}
    everyone = [None] * world
    dist.all_gather_object(everyone, json.dumps(results, sort_keys=True))
    if rank == 0:
        results["ranks_agree"] = all(e == everyone[0] for e in everyone)
        results["world"] = world
        with open(out_path, "w") as f:
            json.dump(results, f)
    acc.wait_for_everyone()
    dist.destroy_process_group()  # a gloo group left for interpreter exit can abort ("terminate called ...")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
