"""A physical judge of the synthetic corpus' attributes: plain signal measurements, no
training — the second, independent judge beside the learned attribute evaluator.

It reads a clip the way the corpus synthesiser (``datamodules.synthetic``) writes one, and
names its labels from measurements only:

* **source** (per event, over its frames above -20 dB of the event's peak): tonal sounds
  have a low spectral flatness, noise-like ones a high one. Among tonal sounds a *sweep*
  moves its peak frequency by more than an octave; a *buzz* (square wave) carries a third
  harmonic at 3 f0, a *tone* does not. Among noise-like sounds *clicks* are sparse: their
  4 ms energy is near silence most of the time and spikes at each click; *noise*'s is not.
* **pitch**: tone/buzz — the peak frequency's nearest of 220 / 440 / 880 Hz (in octaves);
  sweep — the direction of the peak frequency (rising / falling); noise/click — none.
* **pattern**: *pulsing* when the envelope's 3-5.5 Hz modulation (the ≈4 Hz on-off gate)
  is at least half the mean level; otherwise the best least-squares fit of the smoothed
  amplitude envelope among steady (c), fade_in (c·t) and fade_out (c·(1 - t)).
* **structure**: the clip is judged as one event and as two (one per half); it is a
  sequence when the halves differ in source, pitch or pulsing, or when two templates fit
  the envelope much better than one (a fade that restarts at the midpoint).

Everything here is deterministic numpy; thresholds were set on the corpus' real clips and
checked on the evaluation's oracle and VAE-resynthesis rows (``make eval`` reports both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.synthetic import PITCH_HZ  # the pitches the corpus synthesises

SAMPLE_RATE = 16000
FRAME = 160  # 10 ms hop of every envelope / spectrogram frame
N_FFT = 1024
ACTIVE_DB = -20.0  # frames within this of the event's loudest frame describe its source
TONAL_FLATNESS = 0.2  # median spectral flatness below: tone / buzz / sweep
SWEEP_OCTAVES = 1.0  # peak frequency change (first vs last active quarter) above: sweep
BUZZ_THIRD_HARMONIC = 0.01  # power at 3 f0 / power at f0 above: buzz (a square wave: 1/9)
CLICK_SPARSITY = 4.0  # click_sparsity above: click (measured: noise ≤ 1.7, clicks ≥ 6.8, real and resynthesised)
PULSE_MODULATION = 0.5  # envelope 3-5.5 Hz amplitude / mean above: pulsing
TWO_EVENT_GAIN = 3.0  # one-event residual / two-event residual above: a sequence


@dataclass
class Event:
    """What the judge measured of one event (a whole clip or one half)."""

    source: str
    pitch: str
    pattern: str
    residual: float  # of the best non-pulsing envelope template (normalised); 0 when pulsing


def _frames(wave: np.ndarray, size: int) -> np.ndarray:
    """(T, size) frames at a 10 ms hop (zero-padded at the end)."""
    count = max(1, 1 + (len(wave) - 1) // FRAME)
    padded = np.pad(wave, (0, count * FRAME + size))
    index = np.arange(count)[:, None] * FRAME + np.arange(size)[None]
    return padded[index]


def rms_envelope(wave: np.ndarray, window: int = 320) -> np.ndarray:
    """(T,) RMS of ``window``-sample frames centred every 10 ms."""
    frames = _frames(np.pad(wave, (window // 2, 0)), window)
    return np.sqrt(np.mean(frames ** 2, axis=1) + 1e-12)[: max(1, len(wave) // FRAME)]


def _modulation(envelope: np.ndarray, low_hz: float, high_hz: float) -> float:
    """Largest sinusoid amplitude of the (linearly detrended) envelope in [low, high] Hz,
    relative to its mean; frames are 10 ms apart."""
    n = len(envelope)
    if n < 8 or envelope.mean() <= 0:
        return 0.0
    t = np.arange(n)
    detrended = envelope - np.polyval(np.polyfit(t, envelope, 1), t)
    padded = 8 * n
    spectrum = np.abs(np.fft.rfft(detrended, padded)) * 2 / n
    freqs = np.fft.rfftfreq(padded, d=FRAME / SAMPLE_RATE)
    band = (freqs >= low_hz) & (freqs <= high_hz)
    return float(spectrum[band].max() / envelope.mean()) if band.any() else 0.0


def click_sparsity(wave: np.ndarray) -> float:
    """95th / 50th percentile of the 4 ms RMS (2 ms hop) over the frames where the 100 ms
    envelope is within 10 dB of its peak: ≈ 1.1-1.7 for (gated or fading) noise, ≥ 7 for a
    click train (mostly near-silence between 2 ms clicks)."""
    hop, window = 32, 64
    count = (len(wave) - window) // hop
    if count < 60:
        return 1.0
    index = np.arange(count)[:, None] * hop + np.arange(window)[None]
    fine = np.sqrt(np.mean(wave[index] ** 2, axis=1) + 1e-12)  # (count,)
    on = fine[_smooth(fine, 50) > _smooth(fine, 50).max() * 10 ** (-10 / 20)]
    return float(np.percentile(on, 95) / np.percentile(on, 50))


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, len(x)))
    return np.convolve(np.pad(x, (width // 2, width - 1 - width // 2), mode="edge"), np.ones(width) / width, mode="valid")


def _fit_templates(envelope: np.ndarray) -> tuple[str, float]:
    """Best of steady / fade_in / fade_out for an amplitude envelope: (name, residual as a
    fraction of the envelope's energy)."""
    t = (np.arange(len(envelope)) + 0.5) / len(envelope)
    energy = float(np.sum(envelope ** 2)) + 1e-12
    best = ("steady", np.inf)
    for name, template in (("steady", np.ones_like(t)), ("fade_in", t), ("fade_out", 1 - t)):
        gain = max(0.0, float(envelope @ template / (template @ template)))
        residual = float(np.sum((envelope - gain * template) ** 2)) / energy
        if residual < best[1]:
            best = (name, residual)
    return best


def _peak_track(wave: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Power spectra of the active frames (A, F), their peak frequencies (A,) Hz (the lowest
    strong peak, parabolic interpolation) and the frequency of each bin (F,)."""
    frames = _frames(np.pad(wave, (N_FFT // 2, 0)), N_FFT)[: len(active)][active] * np.hanning(N_FFT)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-12  # (A, F)
    freqs = np.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE)
    usable = (freqs >= 100) & (freqs <= 7000)
    masked = np.where(usable[None], power, 0)
    # The lowest local maximum within 15 dB of the frame's strongest: the fundamental of a
    # buzz even where a vocoder left its third harmonic the stronger one.
    local = np.zeros_like(masked, dtype=bool)
    local[:, 1:-1] = (masked[:, 1:-1] >= masked[:, :-2]) & (masked[:, 1:-1] >= masked[:, 2:])
    strong = local & (masked >= masked.max(axis=1, keepdims=True) * 10 ** (-15 / 10))
    k = np.clip(np.where(strong.any(axis=1), strong.argmax(axis=1), masked.argmax(axis=1)), 1, len(freqs) - 2)
    rows = np.arange(len(k))
    a, b, c = np.log(power[rows, k - 1]), np.log(power[rows, k]), np.log(power[rows, k + 1])
    offset = np.clip(0.5 * (a - c) / np.where(np.abs(a - 2 * b + c) > 1e-9, a - 2 * b + c, 1e-9), -0.5, 0.5)
    return power, (k + offset) * SAMPLE_RATE / N_FFT, freqs


def judge_event(wave: np.ndarray) -> Event:
    """Source, pitch and pattern of one event: ``wave`` (S,) float at 16 kHz."""
    envelope = rms_envelope(wave)  # (T,)
    level_db = 20 * np.log10(envelope / envelope.max())
    active = level_db > ACTIVE_DB
    power, peaks, freqs = _peak_track(wave, active)
    usable = (freqs >= 100) & (freqs <= 7000)
    band = power[:, usable]
    flatness = float(np.median(np.exp(np.mean(np.log(band), axis=1)) / np.mean(band, axis=1)))

    if flatness < TONAL_FLATNESS:
        octaves = np.log2(peaks)
        quarter = max(1, len(octaves) // 4)
        change = float(np.median(octaves[-quarter:]) - np.median(octaves[:quarter]))
        if abs(change) > SWEEP_OCTAVES:
            source, pitch = "sweep", "rising" if change > 0 else "falling"
        else:
            f0 = float(np.median(peaks))
            spectrum = power.mean(axis=0)

            def band_power(hz: float) -> float:
                near = np.abs(freqs - hz) <= max(30.0, 0.03 * hz)
                return float(spectrum[near].sum()) if near.any() else 0.0

            third = band_power(3 * f0) / max(band_power(f0), 1e-12) if 3 * f0 < 7500 else 0.0
            source = "buzz" if third > BUZZ_THIRD_HARMONIC else "tone"
            pitch = min(PITCH_HZ, key=lambda name: abs(np.log2(f0 / PITCH_HZ[name])))
    else:
        source = "click" if click_sparsity(wave) > CLICK_SPARSITY else "noise"
        pitch = "none"

    if _modulation(_smooth(envelope, 6), 3.0, 5.5) > PULSE_MODULATION:
        return Event(source, pitch, "pulsing", 0.0)
    pattern, residual = _fit_templates(_smooth(envelope, 10 if source == "click" else 3))
    return Event(source, pitch, pattern, residual)


def judge_clip(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, str]:
    """The corpus' labels (``datamodules.synthetic.LABEL_VALUES`` keys) of one clip."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the physical judge reads {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    wave = np.asarray(wave, dtype=np.float64)
    half = len(wave) // 2
    whole, first, second = judge_event(wave), judge_event(wave[:half]), judge_event(wave[half:])
    differ = (first.source, first.pitch) != (second.source, second.pitch) or \
        (first.pattern == "pulsing") != (second.pattern == "pulsing")
    if not differ and whole.pattern != "pulsing" and first.pattern != "pulsing":
        differ = whole.residual > TWO_EVENT_GAIN * (first.residual + second.residual) + 0.02
    if differ:
        return {"structure": "sequence", "source": first.source, "pitch": first.pitch, "pattern": first.pattern,
                "source2": second.source, "pitch2": second.pitch, "pattern2": second.pattern}
    return {"structure": "single", "source": whole.source, "pitch": whole.pitch, "pattern": whole.pattern,
            "source2": "none", "pitch2": "none", "pattern2": "none"}
