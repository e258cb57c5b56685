import math

import pytest
import torch

from serve.sampling import NextTokenChooser, SamplingParams


@pytest.mark.parametrize("temperature", [5e-273, 1e-30, 1e-5])
def test_tiny_temperature_is_numerically_greedy_not_nan(temperature):
    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    chooser = NextTokenChooser(SamplingParams(do_sample=True, temperature=temperature, seed=0))
    token, logprob = chooser.choose(logits, torch.tensor([0]))
    assert token == 1
    assert math.isfinite(logprob) and logprob == pytest.approx(0.0, abs=1e-6)


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 3.0])
    chooser = NextTokenChooser(SamplingParams(do_sample=True, temperature=2.0, seed=0))
    torch.testing.assert_close(chooser.process(logits, torch.tensor([0])), torch.tensor([0.5, 1.5]))
