"""tools/scaling.py's arithmetic against values computed by hand (pure functions, no model is built)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

import scaling  # noqa: E402

P = 1e9  # parameters


def test_zero3_moves_three_bf16_copies_of_the_model_per_micro_batch():
    # forward gather 2P + backward gather 2P + gradient reduce-scatter 2P bytes, times (N - 1) / N
    assert scaling.bytes_per_gpu(P, 8, 8, "zero3") == {"group": 6e9 * 7 / 8, "node": 0.0}
    assert scaling.bytes_per_gpu(P, 16, 8, "zero3") == {"group": 5.625e9, "node": 0.0}


def test_zero_plus_plus_quantizes_across_nodes_and_keeps_the_backward_gather_in_the_node():
    # qwZ int8 gather P + qgZ int4 reduce-scatter 0.5P over the group; hpZ's bf16 backward gather 2P in the node
    assert scaling.bytes_per_gpu(P, 16, 8, "zero++") == {"group": 1.5e9 * 15 / 16, "node": 2e9 * 7 / 8}
    # the ZeRO++ paper's 3M -> 0.75M across nodes (M = 2P bytes), for a large group
    many = scaling.bytes_per_gpu(P, 10**6, 8, "zero++")["group"] / scaling.bytes_per_gpu(P, 10**6, 8, "zero3")["group"]
    assert many == pytest.approx(0.25)
    with pytest.raises(ValueError, match="zero3 or zero"):
        scaling.bytes_per_gpu(P, 8, 8, "zero2")


def test_times_by_hand():
    link = scaling.Link(nvlink_gbps=400, ib_gbps=50, efficiency=0.5)
    volume = {"group": 10e9, "node": 20e9}
    # one node: all over NVLink at 200 GB/s; several: the group part over InfiniBand at 25 GB/s
    assert scaling.comm_seconds(volume, 1, link) == pytest.approx(30e9 / 200e9)
    assert scaling.comm_seconds(volume, 2, link) == pytest.approx(10e9 / 25e9 + 20e9 / 200e9)
    # 2 pairs of 50 TFLOP at 40% of 1000 TFLOP/s
    assert scaling.compute_seconds(50e12, 2, 1000, 0.4) == pytest.approx(0.25)


def test_the_table_rows_follow_from_the_pieces():
    args = scaling.argparse.Namespace(mfu=0.4, peak_tflops=989.0, nvlink_gbps=450.0, ib_gbps=50.0, efficiency=0.8,
                                      micro_batch_size=1, gpus_per_node=8)
    rows = {(r["model"], r["nodes"], r["kind"]): r for r in scaling.rows(args)}
    assert len(rows) == 3 * 3 * 2
    sdxl = rows[("SDXL UNet", 8, "zero3")]
    # 6 x 2.567e9 x 63/64 bytes over 40 GB/s; 40.46 TFLOP over 395.6 TFLOP/s
    assert sdxl["comm_s"] == pytest.approx(6 * 2_567_463_684 * 63 / 64 / 40e9)
    assert sdxl["compute_s"] == pytest.approx(40_461_684_899_840 / 395.6e12)
    assert sdxl["efficiency"] == pytest.approx(sdxl["compute_s"] / sdxl["comm_s"])
    assert rows[("Wan2.1-T2V-1.3B", 64, "zero3")]["efficiency"] == 1.0
    assert scaling.PARAMS["Wan2.1-T2V-1.3B"] == 1_418_996_800  # the 1.3B's architecture count
