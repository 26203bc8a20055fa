"""Device-agnostic training and generation, checked on the CPU build.

The CPU build cannot make CUDA tensors, so the stand-in is the ``meta`` device: the model
and the batch live on ``meta`` while host bookkeeping stays on the CPU. Then

* a tensor created on a fixed device (a CPU ``torch.zeros``) that meets the data fails
  with a device mismatch, exactly as it would on a GPU;
* reading a value of the data back to the host (``.item()``, ``bool(t)``, ``.tolist()``)
  or boolean-mask indexing (``nonzero``) fails: meta tensors hold no values — the same
  operations are the host–device synchronisations that stall a GPU;
* ``torch.Generator`` is recorded with the device it was asked for, and every random draw
  checks that its generator was made for the device it draws on (a CPU generator drawing
  GPU noise is the first-CUDA-step crash this guards against). Meta has no generators of
  its own, so a generator asked for ``meta`` is backed by a CPU one.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_audio_lm import CAPTIONS, make_batch, make_system, sp_model  # noqa: F401 (fixture)

REAL_GENERATOR = torch.Generator


@pytest.fixture
def recorded_generators(monkeypatch):
    """Patch ``torch.Generator`` and the random functions: returns {id(generator): device type}."""
    intended: dict[int, str] = {}

    class _Meta(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, REAL_GENERATOR)

    class RecordingGenerator(metaclass=_Meta):
        def __new__(cls, device="cpu"):
            requested = torch.device(device)
            generator = REAL_GENERATOR(device="cpu" if requested.type == "meta" else requested)
            intended[id(generator)] = requested.type
            return generator

    def checked(fn):
        def wrapper(*args, generator=None, device=None, **kwargs):
            if generator is not None:
                target = torch.device(device) if device is not None else torch.get_default_device()
                made_for = intended.get(id(generator), "cpu")
                assert made_for == target.type, (
                    f"{fn.__name__}: a generator made for {made_for!r} draws on {target.type!r}"
                )
            return fn(*args, generator=generator, device=device, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    for name in ("rand", "randn", "randint", "randperm"):
        monkeypatch.setattr(torch, name, checked(getattr(torch, name)))
    return intended


@pytest.mark.parametrize("mode", ["drop", "gaussian"])
def test_training_step_runs_on_the_data_device_without_host_syncs(sp_model, recorded_generators, mode):
    system = make_system(
        sp_model, "mntp.ratio.kind=mixture", f"mntp.mode={mode}", "model.input_noise=0.5", "text.p_uncond=0.5",
        "model.rope=true",
    ).to("meta")
    batch = make_batch()
    batch = dict(
        batch, tokens=batch["tokens"].to("meta"), token_mask=batch["token_mask"].to("meta"),
        lengths=batch["token_mask"].sum(1).tolist(),  # the host counts the latent collate supplies
    )
    recorded_generators.clear()
    loss = system.training_step(batch, 0)
    loss.backward()
    assert loss.device.type == "meta"
    assert sorted(recorded_generators.values()) == ["cpu", "meta"]  # host ratios + the data's device
    assert all(p.grad is not None for n, p in system.named_parameters() if n.startswith(("decoder.blocks", "head.")))


def test_a_cpu_generator_meeting_device_data_is_caught(sp_model, recorded_generators):
    """The harness itself: the pre-fix step (a plain CPU generator for every draw) fails it."""
    system = make_system(sp_model).to("meta")
    batch = make_batch()
    batch = dict(batch, tokens=batch["tokens"].to("meta"), token_mask=batch["token_mask"].to("meta"),
                 lengths=batch["token_mask"].sum(1).tolist())
    with pytest.raises(AssertionError, match="made for 'cpu' draws on 'meta'"):
        system.diffusion_loss(batch, torch.zeros(4), torch.Generator(), p_uncond=0.1)


def test_without_host_lengths_the_step_must_read_the_mask(sp_model, recorded_generators):
    """Without ``lengths`` the mask has to be counted on the host: on meta that fails, which is
    how the test above knows the counts it is given are the only ones used."""
    system = make_system(sp_model).to("meta")
    batch = make_batch()
    batch = dict(batch, tokens=batch["tokens"].to("meta"), token_mask=batch["token_mask"].to("meta"))
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        system.training_step(batch, 0)


def test_generation_runs_on_the_data_device_without_host_syncs(sp_model, recorded_generators):
    system = make_system(sp_model, "model.rope=true").to("meta").eval()
    generator = torch.Generator(device=system.device).manual_seed(0)
    tokens = system.generate_tokens(CAPTIONS[:2], num_tokens=4, cfg_scale=3.0, num_steps=3, generator=generator,
                                    cfg_rescale=0.5)
    assert tokens.shape == (2, 4, system.token_dim) and tokens.device.type == "meta"
