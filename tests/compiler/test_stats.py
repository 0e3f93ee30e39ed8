import torch

from finegrain.compiler.stats import StatsStore


def test_stats_equal_direct_computation_over_all_batches():
    store = StatsStore()
    batches = [torch.randn(1, n, 16) * (i + 1) for i, n in enumerate((5, 9, 3))]
    for b in batches:
        store.update("x", b)
    allx = torch.cat([b.reshape(-1, 16) for b in batches])
    st = store["x"]
    assert st.count == 17
    torch.testing.assert_close(st.min, allx.amin(0))
    torch.testing.assert_close(st.max, allx.amax(0))
    torch.testing.assert_close(st.absmax, allx.abs().amax(0))
    torch.testing.assert_close(st.mean_sq, allx.pow(2).mean(0))
    assert abs(st.percentile(100) - allx.abs().max()) < 1e-6 or st.percentile(100) <= allx.abs().max()


def test_sample_is_bounded_and_percentiles_are_close():
    from finegrain.compiler.stats import RESERVOIR

    store = StatsStore()
    for _ in range(20):
        store.update("y", torch.randn(4096, 32))
    st = store["y"]
    assert st.sample.numel() <= RESERVOIR
    assert abs(st.percentile(50) - 0.6745) < 0.03  # median of |N(0,1)|


def test_rows_are_real_rows_bounded_and_drawn_from_every_batch():
    store = StatsStore(rows=64)
    batches = [torch.full((1, 100, 8), float(i)) + torch.arange(8) for i in range(5)]
    for b in batches:
        store.update("x", b)
    rows = store["x"].rows
    assert rows.shape == (64, 8)
    assert torch.equal(rows - rows[:, :1], torch.arange(8.0).expand(64, 8))  # whole rows, not mixed values
    per_batch = torch.bincount(rows[:, 0].long(), minlength=5)
    assert per_batch.min() >= 8  # ~64/5 from each batch, none dropped
    none = StatsStore(rows=0)
    none.update("x", batches[0])
    assert none["x"].rows.shape[0] == 0
