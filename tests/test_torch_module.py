"""pykernels.torch: Linear over a PackedWeight and optimize() on torch models."""
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import pykernels.torch as pkt  # noqa: E402


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(),
                                                 dim=0).item()


@pytest.mark.parametrize("precision,min_cos", [("fp32", 1 - 1e-9), ("bf16", 0.9995),
                                               ("int8", 0.995)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_from_linear_any_leading_dims(precision, min_cos, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 72, bias=bias)
    mod = pkt.Linear.from_linear(lin, precision=precision)
    assert mod.precision == precision and (mod.in_features, mod.out_features) == (48, 72)
    for shape in [(5, 48), (2, 3, 48), (48,)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = lin(x)
            got = mod(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert _cos(got, ref) >= min_cos
    if precision == "fp32":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_linear_fused_activation():
    lin = nn.Linear(32, 16)
    mod = pkt.Linear.from_linear(lin, activation="gelu")
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), nn.functional.gelu(lin(x)), rtol=1e-5, atol=1e-5)


def test_linear_refuses_grad_and_says_no_grad():
    mod = pkt.Linear.from_linear(nn.Linear(8, 4))
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        mod(x)
    with torch.no_grad():
        assert mod(x).shape == (2, 4)
    with torch.inference_mode():
        assert mod(torch.randn(2, 8)).shape == (2, 4)


def test_linear_bad_arguments():
    with pytest.raises(ValueError, match="precision"):
        pkt.Linear.from_linear(nn.Linear(4, 4), precision="fp8")
    with pytest.raises(TypeError, match="nn.Linear"):
        pkt.Linear.from_linear(nn.Conv1d(4, 4, 1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.act = nn.ReLU()
        self.blocks = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.blocks(self.act(self.up(x)))
        return self.mha(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int8_7bit"])
def test_optimize_swaps_in_place_and_reports(precision):
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = net(x)
    report = pkt.optimize(net, precision, accuracy=0.99, example_inputs=(x,))
    assert [s.name for s in report.swapped] == ["up", "blocks.0", "blocks.2"]
    assert report.skipped == ["mha.out_proj"]  # MultiheadAttention reads .weight itself
    assert all(s.precision == precision for s in report.swapped)
    assert report.swapped[0].in_features == 16 and report.swapped[0].out_features == 64
    assert isinstance(net.blocks[0], pkt.Linear)
    assert report.cosine >= 0.99 and precision in str(report)
    with torch.no_grad():
        assert _cos(net(x), ref) >= 0.99


def test_optimize_accuracy_miss_restores_the_model():
    net = _Net().eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="cosine"):
        pkt.optimize(net, "int8", accuracy=1.0, example_inputs=(x,))
    assert type(net.up) is nn.Linear
    with pytest.raises(ValueError, match="example_inputs"):
        pkt.optimize(net, "bf16", accuracy=0.9)


def test_optimize_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    report = pkt.optimize(model, "fp32", accuracy=0.999,
                          example_inputs=dict(input_ids=ids, attention_mask=mask))
    assert len(report.swapped) == 2 * 6 + 1  # q, k, v, out, up, down per layer + pooler
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bench_torch_command(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from pykernels.cli import main
    cfg = transformers.BertConfig(vocab_size=1200, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    js = tmp_path / "bench.json"
    rc = main(["bench", "torch", "--quick", "--model", str(tmp_path), "--batch", "2",
               "--seq", "8", "--budget", "0.01", "--threads", "1", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for case in ("torch fp32", "torch bf16", "torch quantize_dynamic int8", "pykernels fp32",
                 "pykernels bf16", "pykernels int8"):
        assert case in out
    assert js.exists()
