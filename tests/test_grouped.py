"""GroupedResNet18: pack/unpack, per-expert inputs, subsets on views, both executors, errors."""
import copy

import pytest
import torch
from helpers import grouped_grads_per_expert, randomize_, rel_err

import fastmoe_adv as fm

TOL = 1e-5
EXECUTORS = ["grouped", "loop"]

# torchvision's resnet18 key names (the CIFAR variant changes conv1's shape, not its name).
TORCHVISION_KEYS_SAMPLE = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn2.running_var", "layer1.1.conv2.weight",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.num_batches_tracked",
    "layer3.1.bn1.bias", "layer4.0.downsample.0.weight", "layer4.1.bn2.running_mean", "fc.weight", "fc.bias",
]


def _experts(n, width, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return [randomize_(fm.ResNet18(num_classes, width)) for _ in range(n)]


def test_resnet18_torchvision_key_names_and_shapes():
    sd = fm.ResNet18(num_classes=10, width=64).state_dict()
    assert len(sd) == 122  # torchvision resnet18: 62 params + 60 BN buffers
    for key in TORCHVISION_KEYS_SAMPLE:
        assert key in sd, key
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 3)
    assert tuple(sd["layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd["fc.weight"].shape) == (10, 512)
    assert not any("layer1.0.downsample" in k for k in sd)  # stage 1 keeps the width: no projection
    n_params = sum(p.numel() for p in fm.ResNet18(10, 64).parameters())
    assert n_params == 11_173_962  # the CIFAR ResNet-18


def test_resnet18_loads_into_torchvision_when_available():
    try:
        import torchvision
    except Exception as exc:  # the CPU torch build here cannot import torchvision's compiled part
        pytest.skip(f"torchvision not importable: {exc}")
    tv = torchvision.models.resnet18(num_classes=10)
    tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.maxpool = torch.nn.Identity()
    ours = randomize_(fm.ResNet18(10, 64)).eval()
    tv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(tv.eval()(x), ours(x)) <= TOL


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("num_experts,width,batch", [(9, 4, 3), (3, 8, 5), (1, 6, 2)])
def test_load_experts_matches_each_expert(executor, num_experts, width, batch):
    experts = _experts(num_experts, width)
    grouped = fm.GroupedResNet18(num_experts, 10, width, executor=executor)
    grouped.load_expert_state_dicts([m.state_dict() for m in experts])
    x = torch.randn(batch, 3, 32, 32)
    out = grouped.eval()(x)
    assert out.shape == (batch, num_experts, 10)
    for e, m in enumerate(experts):
        assert rel_err(out[:, e], m.eval()(x)) <= TOL


def test_expert_state_dicts_round_trip_bit_exact():
    experts = _experts(9, 4)
    grouped = fm.GroupedResNet18(9, 10, 4)
    grouped.load_expert_state_dicts([m.state_dict() for m in experts])
    back = grouped.expert_state_dicts()
    for m, sd in zip(experts, back):
        ref = m.state_dict()
        assert list(sd.keys()) == list(ref.keys())
        for k in ref:
            assert torch.equal(sd[k], ref[k]), k
            assert sd[k].dtype == ref[k].dtype, k


@pytest.mark.parametrize("executor", EXECUTORS)
def test_per_expert_input_equals_each_expert_on_its_slice(executor):
    experts = _experts(3, 4)
    grouped = fm.GroupedResNet18(3, 10, 4, executor=executor)
    grouped.load_expert_state_dicts([m.state_dict() for m in experts])
    x = torch.randn(5, 3, 3, 32, 32)
    out = grouped.eval()(x)
    for e, m in enumerate(experts):
        assert rel_err(out[:, e], m.eval()(x[:, e])) <= TOL


@pytest.mark.parametrize("executor", EXECUTORS)
def test_train_mode_matches_experts_and_updates_running_stats(executor):
    experts = _experts(3, 4)
    grouped = fm.GroupedResNet18(3, 10, 4, executor=executor)
    grouped.load_expert_state_dicts([m.state_dict() for m in experts])
    x = torch.randn(7, 3, 3, 32, 32, requires_grad=True)
    out = grouped.train()(x)
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()
    xs = [x.detach()[:, e].clone().requires_grad_() for e in range(3)]
    for e, m in enumerate(experts):
        o = m.train()(xs[e])
        (o * g_out[:, e]).sum().backward()
        assert rel_err(out[:, e], o) <= TOL
        assert rel_err(x.grad[:, e], xs[e].grad) <= TOL
    for e, (m, sd, grads) in enumerate(zip(experts, grouped.expert_state_dicts(), grouped_grads_per_expert(grouped))):
        for k, v in m.state_dict().items():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(sd[k], v), k
            else:
                assert rel_err(sd[k], v) <= TOL, k
        for k, p in m.named_parameters():
            assert rel_err(grads[k], p.grad) <= TOL, (e, k)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_subset_runs_on_views_and_touches_only_its_experts(executor):
    experts = _experts(5, 4)
    grouped = fm.GroupedResNet18(5, 10, 4, executor=executor)
    grouped.load_expert_state_dicts([m.state_dict() for m in experts])
    before = grouped.expert_state_dicts()
    # No copies: the subset's conv weight is a view into the grouped storage.
    w = grouped.layer1[0].conv1.weight
    c = grouped.layer1[0].conv1.out_channels
    view = w[1 * c:3 * c]
    assert view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()

    x = torch.randn(4, 2, 3, 32, 32)
    out = grouped.train()(x, experts=slice(1, 3))
    assert out.shape == (4, 2, 10)
    out.square().sum().backward()
    after = grouped.expert_state_dicts()
    grads = grouped_grads_per_expert(grouped)
    for e in range(5):
        stats_changed = not torch.equal(after[e]["bn1.running_mean"], before[e]["bn1.running_mean"])
        grad_nonzero = grads[e]["conv1.weight"].abs().sum().item() > 0
        assert stats_changed == (e in (1, 2)), e
        assert grad_nonzero == (e in (1, 2)), e
        assert int(after[e]["bn1.num_batches_tracked"] - before[e]["bn1.num_batches_tracked"]) == (e in (1, 2))
    # The subset's outputs equal those experts run alone (train-mode BN uses batch stats).
    for j, e in enumerate((1, 2)):
        assert rel_err(out[:, j], experts[e].train()(x[:, j])) <= TOL


def test_subset_spellings_agree():
    grouped = randomize_(fm.GroupedResNet18(4, 10, 4)).eval()
    x = torch.randn(2, 3, 32, 32)
    full = grouped(x)
    for spec in (slice(1, 3), range(1, 3), (1, 3)):
        assert torch.allclose(grouped(x, experts=spec), full[:, 1:3], rtol=1e-5, atol=1e-6)
    assert torch.allclose(grouped(x, experts=2), full[:, 2:3], rtol=1e-5, atol=1e-6)


def test_executors_agree_forward_and_backward():
    grouped = randomize_(fm.GroupedResNet18(9, 10, 8))
    x = torch.randn(3, 3, 32, 32)
    outs, grads = [], []
    for executor in EXECUTORS:
        grouped.zero_grad()
        out = grouped.eval()(x, executor=executor)
        out.sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in grouped.parameters()])
    assert rel_err(outs[0], outs[1]) <= TOL
    for a, b in zip(*grads):
        assert rel_err(a, b) <= TOL


def test_channels_last_matches():
    grouped = randomize_(fm.GroupedResNet18(3, 10, 8)).eval()
    x = torch.randn(3, 3, 32, 32)
    ref = grouped(x)
    cl = grouped.to(memory_format=torch.channels_last)
    for executor in EXECUTORS:
        assert rel_err(cl(x.contiguous(memory_format=torch.channels_last), executor=executor), ref) <= TOL


def test_from_experts_and_to_experts():
    experts = _experts(3, 4)
    grouped = fm.GroupedResNet18.from_experts(experts)
    back = grouped.to_experts()
    x = torch.randn(2, 3, 32, 32)
    for m, b in zip(experts, back):
        assert torch.equal(m.eval()(x), b.eval()(x))


# ------------------------------------------------------------------ errors
def test_bad_inputs_name_expected_and_given():
    grouped = fm.GroupedResNet18(3, 10, 4)
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 4, 32, 32\)"):
        grouped(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"rank 3"):
        grouped(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B,3,3,H,W\].*\(2, 4, 3, 32, 32\)"):
        grouped(torch.randn(2, 4, 3, 32, 32))
    with pytest.raises(TypeError, match="floating-point.*torch.uint8"):
        grouped(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous range"):
        grouped(torch.randn(2, 3, 32, 32), experts=slice(2, 5))
    with pytest.raises(ValueError, match="executor must be one of"):
        grouped(torch.randn(2, 3, 32, 32), executor="fast")
    with pytest.raises(ValueError, match="num_experts"):
        fm.GroupedResNet18(0, 10, 4)
    with pytest.raises(ValueError, match="width"):
        fm.ResNet18(10, 0)


def test_bad_state_dicts():
    grouped = fm.GroupedResNet18(3, 10, 4)
    good = [fm.ResNet18(10, 4).state_dict() for _ in range(3)]
    with pytest.raises(ValueError, match="expected 3 state_dicts.*got 2"):
        grouped.load_expert_state_dicts(good[:2])
    missing = dict(good[1])
    del missing["layer2.0.downsample.0.weight"]
    with pytest.raises(ValueError, match=r"state_dict 1: .*missing \['layer2.0.downsample.0.weight'\]"):
        grouped.load_expert_state_dicts([good[0], missing, good[2]])
    extra = dict(good[2], **{"head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"state_dict 2: .*unexpected \['head.weight'\]"):
        grouped.load_expert_state_dicts([good[0], good[1], extra])
    wrong = dict(good[0], **{"fc.weight": torch.zeros(7, 32)})
    with pytest.raises(ValueError, match=r"fc.weight expected shape \(10, 32\), got \(7, 32\)"):
        grouped.load_expert_state_dicts([wrong, good[1], good[2]])
    with pytest.raises(TypeError, match="list of 3 state_dicts"):
        grouped.load_expert_state_dicts(good[0])


# ------------------------------------------------------------------ layout, layers, empty batches, loop graph
@pytest.mark.parametrize("num_classes,width", [(10, 64), (7, 3)])
def test_expert_keys_and_shapes_equal_resnet18_without_building_one(monkeypatch, num_classes, width):
    want = {k: tuple(v.shape) for k, v in fm.ResNet18(num_classes, width).state_dict().items()}
    grouped = fm.GroupedResNet18(2, num_classes, width)

    def no_build(*args, **kwargs):
        raise AssertionError("expert_keys/check_expert_state_dict must not build a ResNet18")
    monkeypatch.setattr(fm.grouped, "ResNet18", no_build)
    assert grouped.expert_keys() == list(want)
    assert dict(grouped.expert_layout()) == want
    assert set(TORCHVISION_KEYS_SAMPLE) <= set(grouped.expert_keys())
    sd = {k: torch.ones(s) for k, s in want.items()}
    grouped.check_expert_state_dict(sd)  # accepts a correct one without building a model
    assert list(grouped.expert_state_dict(1)) == list(want)


def test_grouped_layers_are_called_as_modules():
    conv = fm.grouped.GroupedConv2d(3, 2, 4, 3, 1, 1)
    bn = fm.grouped.GroupedBatchNorm2d(3, 4).eval()
    fc = fm.grouped.GroupedLinear(3, 4, 5)
    randomize_(bn)
    assert not hasattr(conv, "run") and not hasattr(bn, "run") and not hasattr(fc, "run")
    x = torch.randn(2, 2 * 2, 5, 5)        # experts 1..2, grouped input
    got = bn(conv(x, 1, 3), 1, 3)
    w = conv.weight[4:12]
    ref = torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 2)
    ref = (ref - bn.running_mean[4:12, None, None]) / (bn.running_var[4:12, None, None] + bn.eps).sqrt()
    ref = ref * bn.weight[4:12, None, None] + bn.bias[4:12, None, None]
    assert rel_err(got, ref) <= TOL
    h = torch.randn(2, 3, 4)
    assert rel_err(fc(h), torch.einsum("bnc,nkc->bnk", h, fc.weight) + fc.bias) <= TOL  # default: all experts


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("shape,experts", [((0, 3, 16, 16), None), ((0, 2, 3, 16, 16), (1, 3)), ((0, 3, 8, 8), 2)])
def test_empty_batch_gives_empty_logits(executor, shape, experts):
    grouped = randomize_(fm.GroupedResNet18(4, 10, 4, executor=executor)).eval()
    x = torch.randn(shape, requires_grad=True)
    out = grouped(x, experts=experts)
    n = 4 if experts is None else (1 if isinstance(experts, int) else experts[1] - experts[0])
    assert out.shape == (0, n, 10) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_empty_batch_in_train_mode_is_refused_before_touching_stats():
    grouped = fm.GroupedResNet18(3, 10, 4).train()
    before = {k: v.clone() for k, v in grouped.state_dict().items()}
    with pytest.raises(ValueError, match=r"empty batch \(B=0\) in training mode"):
        grouped(torch.randn(0, 3, 16, 16))
    for k, v in grouped.state_dict().items():
        assert torch.equal(v, before[k]), k


def _graph_node_names(out):
    names, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("per_expert", [False, True])
def test_loop_backward_builds_each_gradient_with_one_cat(per_expert):
    # A per-expert slice of a parameter costs a zeros + copy + accumulate in the backward; the
    # loop must split each parameter once instead (one cat per parameter in the backward).
    grouped = fm.GroupedResNet18(9, 10, 4, executor="loop").train()
    x = torch.randn(2, 9, 3, 8, 8) if per_expert else torch.randn(2, 3, 8, 8)
    names = _graph_node_names(grouped(x))
    n_params = len(list(grouped.parameters()))
    assert names.count("SliceBackward0") == 0
    assert names.count("SelectBackward0") == 0
    assert names.count("SplitBackward0") == n_params
    # the batch counter is bumped once per BatchNorm, for the whole range
    assert all(int(n) == 1 for m in grouped.modules() if isinstance(m, fm.grouped.GroupedBatchNorm2d)
               for n in m.num_batches_tracked)


def test_grouped_executor_full_range_takes_parameters_without_slicing():
    grouped = fm.GroupedResNet18(3, 10, 4, executor="grouped").train()
    assert "SliceBackward0" not in _graph_node_names(grouped(torch.randn(2, 3, 8, 8)))


# ------------------------------------------------------------------ fused BatchNorm (bn_backend)
# The Triton op (CPU interpreter, tests/conftest.py) against the "torch" twin in the whole engine.
# Both run in fp32 and are held to an fp64 run of the twin: each result must be within BN_TOL of
# it, or, where the fp32 twin itself is further off, within BN_FACTOR times the twin's error (a
# forward quantity: its own; a gradient: the twin's worst gradient of the step, the fp32 noise
# level of that backward). At B=3 and 7x7/8x8 images the last stage sees 3 values per channel in
# train mode and the BatchNorm backward on 3 values cancels: the fp32 twin's gradients are up to
# 5e-5 off fp64 there, the kernels' up to 3e-4 (measured); a wrong formula is O(1) off.
# Tiny shapes: the interpreter runs every program in Python.
BN_TOL = 2e-5
BN_FACTOR = 10.0
BN_CASES = [  # (executor, experts, per-expert input, channels_last, image size)
    ("grouped", None, False, False, 8),
    ("grouped", (1, 3), True, True, 7),
    ("loop", None, False, True, 7),
    ("loop", (0, 2), True, False, 8),
]


def _engine_step(engine, x, experts, executor, g_out):
    """(output, input gradient, every parameter gradient, every buffer) of one step."""
    xr = x.clone().to(next(engine.parameters()).dtype).requires_grad_()
    out = engine(xr, experts=experts, executor=executor)
    (out * g_out.to(out.dtype)).sum().backward()
    return [out, xr.grad] + [p.grad for p in engine.parameters()] + [b.clone() for b in engine.buffers()]


def _bn_engines(train, channels_last):
    torch_engine = randomize_(fm.GroupedResNet18(3, 10, 4, bn_backend="torch")).train(train)
    triton_engine, fp64_engine = copy.deepcopy(torch_engine), copy.deepcopy(torch_engine).double()
    triton_engine.bn_backend = "triton"
    engines = (torch_engine, triton_engine, fp64_engine)
    if channels_last:
        engines = tuple(m.to(memory_format=torch.channels_last) for m in engines)
    return engines


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("executor,experts,per_expert,channels_last,hw", BN_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'cl' if c[3] else 'nchw'}-{c[4]}px" for c in BN_CASES])
def test_triton_bn_backend_matches_torch(train, executor, experts, per_expert, channels_last, hw):
    torch.manual_seed(3)
    engines = _bn_engines(train, channels_last)
    n = 3 if experts is None else experts[1] - experts[0]
    x = torch.randn((3, n, 3, hw, hw) if per_expert else (3, 3, hw, hw))
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    before = [b.clone() for b in engines[0].buffers()]
    g_out = torch.randn(3, n, 10)
    ours, twin, exact = (_engine_step(m, x, experts, executor, g_out) for m in engines)
    names = ["output", "input grad"] + [f"grad {k}" for k, _ in engines[0].named_parameters()] + \
        [f"buffer {k}" for k, _ in engines[0].named_buffers()]
    n_params = len(list(engines[0].parameters()))
    grad_noise = max(rel_err(b, ref) for b, ref in zip(twin[1:2 + n_params], exact[1:2 + n_params]))
    for i, (name, a, b, ref) in enumerate(zip(names, ours, twin, exact)):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b) and torch.equal(a, ref), name
            continue
        noise = grad_noise if 1 <= i < 2 + n_params else rel_err(b, ref)
        assert rel_err(a, ref) <= max(BN_TOL, BN_FACTOR * noise), name
    # train mode moves exactly the active experts' statistics; eval mode moves none
    lo, hi = (0, 3) if experts is None else experts
    for name, old, new in zip(names[2 + n_params:], before, ours[2 + n_params:]):
        c = old.numel() // 3
        for e in range(3):
            assert torch.equal(new[e * c:(e + 1) * c], old[e * c:(e + 1) * c]) != (train and lo <= e < hi), (name, e)


def test_torch_bn_backend_is_the_ops_twin_bit_for_bit():
    # The module's inline "torch" path and batch_norm_act_torch are the same three ops.
    from fastmoe_adv.kernels import batch_norm_act_torch
    bn = randomize_(fm.grouped.GroupedBatchNorm2d(3, 5)).train()
    twin = copy.deepcopy(bn)
    x, res = torch.randn(4, 10, 3, 3), torch.randn(4, 10, 3, 3)
    got = bn(x, 1, 3, relu=True, residual=res)
    s = slice(5, 15)
    want = batch_norm_act_torch(x, twin.weight[s], twin.bias[s], twin.running_mean[s], twin.running_var[s],
                                training=True, momentum=twin.momentum, eps=twin.eps, relu=True, residual=res)
    assert torch.equal(got, want)
    assert torch.equal(bn.running_mean, twin.running_mean) and torch.equal(bn.running_var, twin.running_var)
    assert (got >= 0).all() and (got == 0).any()  # the ReLU ran


def test_bn_backend_choice_is_checked():
    with pytest.raises(ValueError, match="bn_backend must be one of.*'cudnn'"):
        fm.GroupedResNet18(2, 10, 4, bn_backend="cudnn")
    engine = fm.GroupedResNet18(2, 10, 4)
    assert engine.bn_backend == "torch" and "bn_backend='torch'" in engine.extra_repr()
    engine.bn_backend = "fused"  # a plain attribute: checked when the engine runs
    with pytest.raises(ValueError, match="bn_backend must be one of.*'fused'"):
        engine(torch.randn(2, 3, 8, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cuda_compiled_bn_backend_matches_torch(executor, train):
    # The compiled kernels (TRITON_INTERPRET=0 pytest -m cuda) in the whole engine, bf16 autocast and
    # channels_last as training runs it: each backend against an fp32 run with TF32 off; the fused
    # op rounds once where the twin rounds after BN and after the add, so it may be closer, and may
    # not be much further.
    from fastmoe_adv.kernels import dispatch
    if dispatch.interpreter_enabled() or not dispatch.triton_available():
        pytest.skip("needs compiled Triton kernels: run with TRITON_INTERPRET=0")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(5)
        base = randomize_(fm.GroupedResNet18(9, 10, 16)).cuda().train(train).to(memory_format=torch.channels_last)
        x = torch.randn(24, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
        g_out = torch.randn(24, 9, 10, device="cuda")
        exact = _engine_step(copy.deepcopy(base), x, None, executor, g_out)
        errs = {}
        for bn in ("torch", "triton"):
            engine = copy.deepcopy(base)
            engine.bn_backend = bn
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got = _engine_step(engine, x, None, executor, g_out)
            errs[bn] = [rel_err(a.float(), b) for a, b in zip(got[:2], exact[:2])]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    for i, what in enumerate(("output", "input grad")):
        assert errs["triton"][i] <= max(5e-2, 2.0 * errs["torch"][i]), (what, errs)
