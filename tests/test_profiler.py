"""What the profiler measures, checked against what can be computed by hand, with real torch/onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from toolkit.models import load_model, split
from toolkit.profiler.memory import peak_transient_bytes, saved_tensor_bytes

BATCH = 8


def test_static_quantities_of_lenet(lenet_profile) -> None:
    profile, _ = lenet_profile
    by_name = {layer.name: layer for layer in profile.layers}
    assert by_name["pool2"].output_shape == [16, 5, 5]
    assert by_name["pool2"].output_bytes_per_sample == 400 * 4
    assert by_name["fc1"].param_count == 400 * 120 + 120
    assert profile.cut(6).smashed_bytes_per_sample == 1600
    assert profile.cut(6).device_param_count == (25 * 6 + 6) + (6 * 25 * 16 + 16)
    assert profile.cut(6).device_flops_per_sample + profile.cut(6).server_flops_per_sample == (
        profile.full_model.flops_per_sample
    )
    # SGD with momentum keeps one buffer per parameter
    assert profile.cut(6).optimizer_state_bytes == profile.cut(6).device_param_bytes
    assert [c.cut for c in profile.cuts] == list(range(1, 12))


def test_saved_bytes_of_a_linear_layer_are_its_input(lenet_profile) -> None:
    profile, _ = lenet_profile
    fc1 = next(layer for layer in profile.layers if layer.name == "fc1")
    # fc1's input (B x 400 floats) is kept for the weight gradient; the weight itself is not counted
    assert fc1.batches[0].saved_bytes == BATCH * 400 * 4


def test_timings_are_positive_and_ordered(lenet_profile) -> None:
    profile, _ = lenet_profile
    for cut in profile.cuts:
        batch = cut.batches[0]
        assert batch.batch_size == BATCH
        assert 0 < batch.forward_s.p10 <= batch.forward_s.median <= batch.forward_s.p90
        assert batch.backward_s.median > 0 and batch.step_s.median > 0
        assert batch.step_s.median >= batch.forward_s.p10 + batch.backward_s.p10
        assert batch.forward_layer_sum_s > 0 and batch.backward_layer_sum_s > 0
        assert batch.peak_memory_bytes > batch.peak_transient_bytes > 0
    assert profile.full_model.batches[0].step_s.median > 0
    assert profile.backward_call_overhead_s > 0


def test_onnx_files_are_valid_and_match_torch(lenet_profile) -> None:
    profile, folder = lenet_profile
    model = load_model("lenet5", seed=0)
    x = torch.randn(5, 1, 28, 28)  # another batch size than exported: the batch axis is dynamic
    for cut in profile.cuts:
        path = folder / cut.onnx.file
        onnx.checker.check_model(onnx.load(str(path)))
        device, _ = split(model, cut.cut)
        with torch.no_grad():
            expected = device.eval()(x).numpy()
        got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert cut.onnx.max_abs_error <= 1e-5
        assert cut.batches[0].onnx_inference_s.median > 0


def test_profiling_does_not_change_the_callers_weights() -> None:
    from toolkit.profiler.runner import ProfileRequest, run_profile

    model = load_model("lenet5", seed=0)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    run_profile(ProfileRequest(model=model, batch_sizes=[4], repeats=2, warmup=0, threads=1, cuts=[3]))
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, before[key])


def test_profiling_leaves_the_callers_thread_count_and_random_state_as_they_were() -> None:
    from toolkit.profiler.runner import ProfileRequest, run_profile

    model = load_model("lenet5", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads != 2 else 1)
    try:
        chosen = torch.get_num_threads()
        torch.manual_seed(1234)
        expected = torch.rand(3)
        torch.manual_seed(1234)
        run_profile(ProfileRequest(model=model, batch_sizes=[4], repeats=2, warmup=0, threads=3, cuts=[3], seed=7))
        assert torch.get_num_threads() == chosen
        assert torch.equal(torch.rand(3), expected)  # the profile's seed did not replace ours
    finally:
        torch.set_num_threads(threads)


def test_device_description_is_filled(lenet_profile) -> None:
    device = lenet_profile[0].device
    assert device.cores_logical >= 1 and device.ram_bytes > 0
    assert device.torch == torch.__version__ and device.accelerator == "cpu"
    assert device.board and device.cpu_model


def test_peak_memory_sees_a_known_allocation() -> None:
    size = 4 * 2**20

    def step() -> None:
        buffer = torch.empty(size, dtype=torch.uint8)
        buffer.fill_(1)
        del buffer

    assert size <= peak_transient_bytes(step, torch.device("cpu")) < size + 2**20


def test_saved_tensor_bytes_count_each_storage_once() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    layer = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU())
    # Linear saves x (16*32 floats); ReLU saves its output (16*32 floats)
    assert saved_tensor_bytes(lambda: layer(x), list(layer.parameters())) == 2 * 16 * 32 * 4
