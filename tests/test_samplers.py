"""samplers/: bit-exact parity with diffusers' FlowMatchEulerDiscreteScheduler and StableDiffusion3Pipeline.

The sampling loop is checked against the real ``StableDiffusion3Pipeline.__call__`` (given precomputed
embeddings and ``output_type="latent"``, it needs neither text encoders nor a VAE) and against the scheduler
driven by hand, both with a cheap deterministic stand-in for the transformer.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from mmdit.conditioning import Conditioning
from samplers import (
    PRESETS,
    Guidance,
    ModelCall,
    cfg,
    euler_step,
    initial_noise,
    sample,
    shifted,
    sigmas,
    slg,
    slg_active,
    timesteps,
    unshifted,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def scheduler(steps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    return s


# ----------------------------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("shift", [1.0, 3.0, 2.5])
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 28, 40, 50])
def test_sigmas_and_timesteps_equal_diffusers(steps: int, shift: float) -> None:
    ref = scheduler(steps, shift)
    s = sigmas(steps, shift)
    assert s.dtype == torch.float32 and s.shape == (steps + 1,)
    assert torch.equal(s, ref.sigmas)
    assert s[0] == 1.0 and s[-1] == 0.0
    t = timesteps(s)
    assert t.dtype == torch.float32
    assert torch.equal(t, ref.timesteps)


def test_schedule_reference_values() -> None:
    # FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps values (docs/numerics.md §2)
    t28 = timesteps(sigmas(28, 3.0))
    expected_28 = [1000.0, 987.380615, 974.107727, 199.826981, 110.905731, 8.928572]
    assert t28[[0, 1, 2, -3, -2, -1]].tolist() == pytest.approx(expected_28, abs=2e-4)
    t40 = timesteps(sigmas(40, 3.0))
    expected_40 = [1000.0, 991.330872, 982.355774, 146.508728, 81.045753, 8.928572]
    assert t40[[0, 1, 2, -3, -2, -1]].tolist() == pytest.approx(expected_40, abs=2e-4)
    assert timesteps(sigmas(4, 3.0)).tolist() == pytest.approx([1000.0, 857.692322, 602.150574, 8.928572], abs=2e-4)
    assert sigmas(4, 1.0).tolist() == pytest.approx([1.0, 0.667, 0.334, 0.001, 0.0], abs=1e-6)
    # The low end is shifted twice: shift(shift(0.001)), not shift(0.001).
    assert sigmas(28, 3.0)[-2].item() == pytest.approx(shifted(shifted(0.001, 3.0), 3.0), rel=1e-6)
    assert sigmas(28, 3.0)[-2].item() == pytest.approx(0.0089285718, rel=1e-6)


def test_shift_and_inverse() -> None:
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for a in (1.0, 2.5, 3.0):
        assert torch.allclose(unshifted(shifted(u, a), a), u, atol=1e-12)
        assert torch.allclose(shifted(unshifted(u, a), a), u, atol=1e-12)
    assert shifted(0.5, 3.0) == pytest.approx(0.75)
    assert unshifted(0.75, 3.0) == pytest.approx(0.5)
    assert unshifted(sigmas(10, 3.0)[1].item(), 3.0) < sigmas(10, 3.0)[1].item()  # shifting pushes σ up


def test_schedule_bad_input() -> None:
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            sigmas(bad, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shift"):
        sigmas(10, 0.0)
    with pytest.raises(ValueError, match="1-D"):
        timesteps(torch.ones(1))


# ----------------------------------------------------------------------------------------------------------------
# Euler step


@pytest.mark.parametrize("sample_dtype", DTYPES)
@pytest.mark.parametrize("v_dtype", DTYPES)
def test_euler_step_equals_scheduler_step(sample_dtype: torch.dtype, v_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    steps = 10
    s = sigmas(steps, 3.0)
    ref = scheduler(steps, 3.0)
    for i in range(steps):
        x = torch.randn(2, 16, 8, 8, generator=g).to(sample_dtype)
        v = (3 * torch.randn(2, 16, 8, 8, generator=g)).to(v_dtype)
        expected = ref.step(v, ref.timesteps[i], x, return_dict=False)[0]
        got = euler_step(x, v, s[i], s[i + 1])
        assert got.dtype == expected.dtype == v_dtype
        assert torch.equal(got, expected), (i, sample_dtype, v_dtype)
        # Python floats are rounded to float32 first and give the same result.
        assert torch.equal(euler_step(x, v, s[i].item(), s[i + 1].item()), expected)


def test_euler_step_rounds_dt_times_v_in_model_dtype() -> None:
    # The subtle part of diffusers' step: dt is a 0-dim float32 tensor, so dt·v is a bf16 product (dt rounded to
    # bf16); only the addition to the latent is float32. An all-float32 update gives different bits.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 16, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(4, 16, 16, 16, generator=g).to(torch.bfloat16)
    s = sigmas(28, 3.0)
    dt = s[5] - s[4]
    got = euler_step(x, v, s[4], s[5])
    assert torch.equal(got, (x.float() + dt.to(torch.bfloat16) * v).to(torch.bfloat16))
    assert not torch.equal(got, (x.float() + dt * v.float()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="shapes differ"):
        euler_step(x, v[:1], s[0], s[1])


# ----------------------------------------------------------------------------------------------------------------
# guidance and presets


@pytest.mark.parametrize(
    ("steps", "active"),
    [(10, [1]), (28, [1, 2, 3, 4, 5]), (40, [1, 2, 3, 4, 5, 6, 7]), (50, list(range(1, 10))), (4, [])],
)
def test_slg_window(steps: int, active: list[int]) -> None:
    assert [i for i in range(steps) if slg_active(i, steps, 0.01, 0.2)] == active


def test_cfg_and_slg_arithmetic() -> None:
    g = torch.Generator().manual_seed(2)
    u, c, k, v = (torch.randn(2, 4, 3, 3, generator=g).to(torch.bfloat16) for _ in range(4))
    out = cfg(u, c, 4.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, u + 4.5 * (c - u))
    assert torch.equal(cfg(u, c, 1.0), u + 1.0 * (c - u))
    assert torch.equal(slg(v, c, k, 2.8), v + (c - k) * 2.8)


def test_guidance_flags() -> None:
    assert not Guidance(1.0).cfg_on and not Guidance(0.0).cfg_on and Guidance(1.01).cfg_on
    assert Guidance(4.5, (7, 8, 9)).slg_on
    assert not Guidance(4.5).slg_on
    assert not Guidance(1.0, (7, 8, 9)).slg_on  # diffusers applies SLG only inside the CFG branch
    with pytest.raises(ValueError, match="slg_layers"):
        Guidance(4.5, [7, 8])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slg_start"):
        Guidance(4.5, (7,), slg_start=0.5, slg_stop=0.2)
    with pytest.raises(AttributeError):
        Guidance(4.5).scale = 2.0  # type: ignore[misc]


def test_presets() -> None:
    assert set(PRESETS) == {"sd3-medium", "sd3.5-medium", "sd3.5-large", "sd3.5-large-turbo"}
    assert all(p.shift == 3.0 for p in PRESETS.values())
    m = PRESETS["sd3.5-medium"]
    assert (m.steps, m.cfg, m.slg_layers, m.slg_scale) == (40, 4.5, (7, 8, 9), 2.8)
    assert m.guidance == Guidance(4.5, (7, 8, 9), 2.8, 0.01, 0.2) and m.guidance.slg_on
    assert (PRESETS["sd3-medium"].steps, PRESETS["sd3-medium"].cfg) == (28, 7.0)
    assert (PRESETS["sd3.5-large"].steps, PRESETS["sd3.5-large"].cfg) == (28, 3.5)
    turbo = PRESETS["sd3.5-large-turbo"]
    assert turbo.steps == 4 and not turbo.guidance.cfg_on
    assert not PRESETS["sd3.5-large"].guidance.slg_on


# ----------------------------------------------------------------------------------------------------------------
# the loop

LATENT_C, LATENT_HW, SEQ, WIDTH, POOLED = 16, 4, 5, 8, 6  # 32×32-pixel images


def fake_velocity(x: Tensor, t: Tensor, context: Tensor, pooled: Tensor, skip_layers: tuple[int, ...]) -> Tensor:
    """A cheap deterministic stand-in for the MM-DiT that depends on every input, computing in x's dtype."""
    dtype = x.dtype
    time = (t / 1000).to(dtype)[:, None, None, None]  # (B, 1, 1, 1)
    ctx = context.mean(dim=(1, 2)).to(dtype)[:, None, None, None]  # (B, 1, 1, 1)
    pool = (pooled[:, :LATENT_C] if pooled.shape[1] >= LATENT_C else pooled.mean(1, keepdim=True)).to(dtype)
    channel = torch.linspace(-1, 1, x.shape[1], dtype=dtype)[None, :, None, None]  # (1, C, 1, 1)
    v = torch.sin(1.3 * x + time) * (1 + ctx) + channel * pool[:, :, None, None] - 0.5 * x
    if skip_layers:
        v = v + 0.1 * sum(i + 1 for i in skip_layers) * torch.tanh(x + time)
    return v


class FakeTransformer(nn.Module):
    """Quacks like SD3Transformer2DModel as far as StableDiffusion3Pipeline.__call__ is concerned."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=LATENT_C, patch_size=2, sample_size=LATENT_HW)
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    @property
    def device(self) -> torch.device:  # the pipeline asks its models where to run
        return torch.device("cpu")

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ) -> tuple[Tensor]:
        skip = tuple(skip_layers or ())
        self.calls.append((hidden_states.shape[0], skip))
        return (fake_velocity(hidden_states, timestep, encoder_hidden_states, pooled_projections, skip),)


def make_conditioning(batch: int, dtype: torch.dtype, seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, SEQ, WIDTH, generator=g).to(dtype)
    pooled = torch.randn(batch, POOLED, generator=g).to(dtype)
    return Conditioning(context, pooled)


def recording_denoiser(log: list[tuple[int, ModelCall, Tensor]]):
    def denoise(x: Tensor, t: Tensor, cond: Conditioning, call: ModelCall) -> Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        assert cond.context.shape[0] == x.shape[0] == cond.pooled.shape[0]
        log.append((x.shape[0], call, t))
        return fake_velocity(x, t, cond.context, cond.pooled, call.skip_layers)

    return denoise


def run_pipeline(
    steps: int, guidance: Guidance, pos: Conditioning, neg: Conditioning | None, seed: int
) -> tuple[Tensor, list[Tensor], list[tuple[int, tuple[int, ...]]]]:
    transformer = FakeTransformer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    per_step: list[Tensor] = []

    def on_step_end(pipeline, i: int, t: Tensor, kwargs: dict) -> dict:
        assert i == len(per_step)
        per_step.append(kwargs["latents"].clone())
        return {}

    out = pipe(
        prompt_embeds=pos.context,
        pooled_prompt_embeds=pos.pooled,
        negative_prompt_embeds=None if neg is None else neg.context,
        negative_pooled_prompt_embeds=None if neg is None else neg.pooled,
        height=8 * LATENT_HW,
        width=8 * LATENT_HW,
        num_inference_steps=steps,
        guidance_scale=guidance.scale,
        skip_guidance_layers=list(guidance.slg_layers) or None,
        skip_layer_guidance_scale=guidance.slg_scale,
        skip_layer_guidance_start=guidance.slg_start,
        skip_layer_guidance_stop=guidance.slg_stop,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
        callback_on_step_end=on_step_end,
    ).images
    return out, per_step, transformer.calls


CASES = {
    "cfg-off": (Guidance(1.0), 1),
    "turbo-cfg-0": (Guidance(0.0), 2),
    "cfg": (Guidance(4.5), 1),
    "cfg-2-prompts": (Guidance(7.0), 2),
    "cfg-slg": (Guidance(4.5, (1, 3), slg_scale=2.8), 2),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_sample_equals_stable_diffusion3_pipeline(case: str, dtype: torch.dtype) -> None:
    guidance, batch = CASES[case]
    steps, seed = 10, 1234
    pos = make_conditioning(batch, dtype, seed=1)
    neg = make_conditioning(batch, dtype, seed=2) if guidance.cfg_on else None
    expected, expected_steps, pipe_calls = run_pipeline(steps, guidance, pos, neg, seed)

    log: list[tuple[int, ModelCall, Tensor]] = []
    per_step: list[tuple[int, Tensor]] = []
    noise = initial_noise(batch, 8 * LATENT_HW, 8 * LATENT_HW, seed, dtype=dtype)
    got = sample(
        recording_denoiser(log),
        noise,
        sigmas(steps, 3.0),
        pos,
        neg,
        guidance,
        callback=lambda i, x: per_step.append((i, x.clone())),
    )
    assert got.dtype == expected.dtype == dtype and got.shape == (batch, LATENT_C, LATENT_HW, LATENT_HW)
    assert torch.equal(got, expected)
    assert [i for i, _ in per_step] == list(range(steps))
    for (_, ours), theirs in zip(per_step, expected_steps, strict=True):
        assert torch.equal(ours, theirs)
    # Same sequence of model calls (batch size, skipped layers) as the pipeline.
    assert [(b, call.skip_layers) for b, call, _ in log] == pipe_calls
    assert not torch.equal(got, noise.to(dtype))


def test_conditioning_rows_and_guidance_matter() -> None:
    # The parity test above could pass with a loop that ignores an argument only if diffusers ignored it too;
    # make sure each input actually changes the result.
    steps, batch = 6, 2
    pos, neg = make_conditioning(batch, torch.float32, 1), make_conditioning(batch, torch.float32, 2)
    noise = initial_noise(batch, 32, 32, 0)
    s = sigmas(steps, 3.0)
    denoise = recording_denoiser([])
    base = sample(denoise, noise, s, pos, neg, Guidance(4.5))
    assert not torch.equal(base, sample(denoise, noise, s, neg, pos, Guidance(4.5)))  # swapped prompts
    assert not torch.equal(base, sample(denoise, noise, s, pos, neg, Guidance(5.0)))
    assert not torch.equal(base, sample(denoise, noise, s, pos, neg, Guidance(4.5, (1,))))
    assert not torch.equal(base, sample(denoise, noise, s, pos, None, Guidance(1.0)))
    # With CFG off the negative is ignored.
    assert torch.equal(
        sample(denoise, noise, s, pos, None, Guidance(1.0)), sample(denoise, noise, s, pos, neg, Guidance(1.0))
    )


def reference_loop(
    steps: int, guidance: Guidance, noise: Tensor, pos: Conditioning, neg: Conditioning | None
) -> tuple[Tensor, list[tuple[int, int, tuple[int, ...]]]]:
    """StableDiffusion3Pipeline's loop written out around the real scheduler (no pipeline object)."""
    sched = scheduler(steps, 3.0)
    do_cfg = guidance.scale > 1
    context, pooled = pos.context, pos.pooled
    if do_cfg:
        context, pooled = torch.cat([neg.context, pos.context]), torch.cat([neg.pooled, pos.pooled])
    latents, calls = noise, []
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([latents] * 2) if do_cfg else latents
        v = fake_velocity(x_in, t.expand(x_in.shape[0]), context, pooled, ())
        calls.append((i, x_in.shape[0], ()))
        if do_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance.scale * (v_c - v_u)
            if guidance.slg_layers and steps * guidance.slg_start < i < steps * guidance.slg_stop:
                t_skip = t.expand(latents.shape[0])
                v_skip = fake_velocity(latents, t_skip, pos.context, pos.pooled, guidance.slg_layers)
                calls.append((i, latents.shape[0], guidance.slg_layers))
                v = v + (v_c - v_skip) * guidance.slg_scale
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents, calls


@pytest.mark.parametrize(("steps", "slg_steps"), [(10, [1]), (28, [1, 2, 3, 4, 5]), (40, [1, 2, 3, 4, 5, 6, 7])])
def test_sample_equals_scheduler_loop_and_slg_steps(steps: int, slg_steps: list[int]) -> None:
    batch, dtype = 2, torch.bfloat16
    guidance = PRESETS["sd3.5-medium"].guidance
    pos, neg = make_conditioning(batch, dtype, 3), make_conditioning(batch, dtype, 4)
    noise = initial_noise(batch, 32, 32, seed=7, dtype=dtype)
    expected, ref_calls = reference_loop(steps, guidance, noise, pos, neg)

    log: list[tuple[int, ModelCall, Tensor]] = []
    got = sample(recording_denoiser(log), noise, sigmas(steps, 3.0), pos, neg, guidance)
    assert torch.equal(got, expected)
    assert [(call.step, b, call.skip_layers) for b, call, _ in log] == ref_calls
    assert [call.step for _, call, _ in log if call.skip_layers] == slg_steps
    times = timesteps(sigmas(steps, 3.0))
    for b, call, t in log:
        assert torch.equal(t, times[call.step].expand(b))
        # Positive rows: second half of the doubled CFG batch, every row of the SLG pass.
        assert call.positive == (slice(0, batch) if call.skip_layers else slice(batch, 2 * batch))
        assert call.skip_layers in ((), (7, 8, 9))


def test_callback_once_per_step_and_cfg_off_rows() -> None:
    log: list[tuple[int, ModelCall, Tensor]] = []
    seen: list[int] = []
    pos = make_conditioning(3, torch.float32, 5)
    out = sample(
        recording_denoiser(log), initial_noise(3, 32, 32, 0), sigmas(4, 3.0), pos, None, Guidance(0.0),
        callback=lambda i, x: seen.append(i),
    )  # fmt: skip
    assert seen == [0, 1, 2, 3]
    assert out.shape == (3, LATENT_C, LATENT_HW, LATENT_HW)
    assert [(b, call.step, call.positive, call.skip_layers) for b, call, _ in log] == [
        (3, i, slice(0, 3), ()) for i in range(4)
    ]


def test_sample_bad_input() -> None:
    pos = make_conditioning(2, torch.float32, 1)
    noise = initial_noise(2, 32, 32, 0)
    denoise = recording_denoiser([])
    with pytest.raises(ValueError, match="negative"):
        sample(denoise, noise, sigmas(4, 3.0), pos, None, Guidance(4.5))
    with pytest.raises(ValueError, match="batch"):
        sample(denoise, noise[:1], sigmas(4, 3.0), pos, None, Guidance(1.0))
    with pytest.raises(ValueError, match="sigmas"):
        sample(denoise, noise, torch.ones(1), pos, None, Guidance(1.0))
    short_neg = Conditioning(pos.context[:, :2], pos.pooled)
    with pytest.raises(ValueError, match="token count"):
        sample(denoise, noise, sigmas(4, 3.0), pos, short_neg, Guidance(4.5))


# ----------------------------------------------------------------------------------------------------------------
# initial noise


@pytest.mark.parametrize("dtype", DTYPES)
def test_initial_noise_equals_randn_tensor(dtype: torch.dtype) -> None:
    seed, batch, height, width = 42, 2, 64, 48
    expected = randn_tensor(
        (batch, 16, height // 8, width // 8),
        generator=torch.Generator("cpu").manual_seed(seed),
        device=torch.device("cpu"),
        dtype=dtype,
    )
    got = initial_noise(batch, height, width, seed, dtype=dtype)
    assert got.dtype == dtype and got.shape == (2, 16, 8, 6)
    assert torch.equal(got, expected)
    assert torch.equal(initial_noise(1, height, width, seed, dtype=dtype)[0], got[0])  # image 0 = single draw
    assert not torch.equal(initial_noise(batch, height, width, seed + 1, dtype=dtype), got)
    assert abs(got.float().std().item() - 1) < 0.2 and math.isfinite(got.float().sum().item())


def test_initial_noise_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        initial_noise(1, 100, 64, 0)
    with pytest.raises(ValueError, match="batch"):
        initial_noise(0, 64, 64, 0)
