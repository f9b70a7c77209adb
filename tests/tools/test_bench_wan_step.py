"""tools/bench_wan_step.py runs end to end on a tiny model (CPU), and its two measured variants differ
in what they claim to: the masked-attention paths agree with float32, the copy variant copies."""
import re
from pathlib import Path

import torch
from tests.helpers.scripts import load_module

ROOT = Path(__file__).resolve().parents[2]
bench = load_module("bench_wan_step", ROOT / "tools" / "bench_wan_step.py")


def test_tiny_run_prints_every_case_and_a_small_bf16_error(capsys):
    assert bench.main(["--preset", "tiny-t2v", "--latent", "6", "4", "4", "--repeats", "1", "--device", "cpu",
                       "--cases", "bidir", "rollout", "rollout_copy", "sdpa_mask", "--reference"]) == 0
    out = capsys.readouterr().out
    for case in ("bidir", "rollout", "rollout_copy", "sdpa_mask"):
        row = re.search(rf"^\s*{case}\s+([0-9.]+)\s", out, re.M)
        assert row and float(row.group(1)) > 0, (case, out)
    err = re.search(r"sdpa_mask vs float32 .* output rel. error ([0-9.e+-]+); .* worst rel. error ([0-9.e+-]+)", out)
    assert err, out
    assert 0 < float(err.group(1)) < 2e-2 and 0 < float(err.group(2)) < 5e-2  # bf16 rounding, not a wrong mask


def test_copy_variant_copies_the_snapshot_and_the_default_does_not():
    def past_is_view():
        cache = bench.KVCache(torch.zeros(1, 8, 1, 2), torch.zeros(1, 8, 1, 2))
        cache.begin(0, 2, snapshot=True).extend(torch.ones(1, 2, 1, 2), torch.ones(1, 2, 1, 2))
        step = cache.begin(2, 2, snapshot=True)
        return step.past[0].data_ptr() == cache.k.data_ptr()

    assert past_is_view()
    with bench.copied_snapshots():
        assert not past_is_view()
    assert past_is_view()  # restored


def test_model_flops_of_one_forward():
    from megadistill.models.wan.config import wan_config

    cfg = wan_config("wan2.1-t2v-1.3b")
    L, T, d, f = 32760, cfg.text_len, 1536, 8960
    # per layer: self-attention q, k, v, o GEMMs and L x L scores / values; cross-attention q, o on the
    # video tokens, k, v on the text tokens and L x T scores / values; the FFN's two GEMMs
    per_layer = 2 * L * 4 * d * d + 4 * L * L * d + 2 * L * 2 * d * d + 2 * T * 2 * d * d + 4 * L * T * d \
        + 2 * L * 2 * d * f
    assert bench.forward_flops(cfg, L) == 30 * per_layer
