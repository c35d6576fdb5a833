"""Training presets: every number that defines a run, stored in each checkpoint's provenance."""

from __future__ import annotations

from dataclasses import dataclass, replace

#: The recipe's stages, in the order they run.
STAGES = ("vae", "decoder", "teacher", "lcm", "polish", "pix2pix")


@dataclass
class TrainPreset:
    """Everything that defines a training run (stored in every checkpoint's provenance)."""

    name: str
    data_presets: tuple[str, ...] = ("brain-20x", "tumour-dense-20x")
    n_fields: int = 96
    field_size: int = 256
    crop: int = 128
    batch: int = 12
    vae_crop: int = 64
    vae_steps: int = 4000
    teacher_steps: int = 10000
    lcm_steps: int = 3000
    pix2pix_steps: int = 3300
    high_t_fraction: float = 0.5
    high_t_min: int = 600
    lr: float = 5e-4
    anchor_weight: float = 8.0
    ema_teacher: float = 0.999
    ema_target: float = 0.95
    huber_c: float = 1e-3
    unet_channels: tuple[int, ...] = (24, 48, 96, 160)
    # a convolutional encoder of the qOBM at full resolution beside the unshuffled pixels
    # (`models.LatentUNet(cond_channels=...)`); () = none, the network before it
    unet_cond_channels: tuple[int, ...] = ()
    vae_channels: int = 32
    pix2pix_ngf: int = 16
    pix2pix_depth: int = 6
    latent_channels: int = 4
    latent_factor: int = 4
    # Inference decoder: 0 steps = ship the VAE's own decoder; > 0 = after the VAE, refit a thinner
    # decoder on the frozen encoder for this many steps (the latent space does not change).
    decoder_steps: int = 0
    dec_quarter_channels: int = 16
    dec_half_channels: int = 8
    dec_half_conv: bool = False
    # After distillation, tune that decoder on a 50/50 mix of encoder and LCM-1 latents ("polish"):
    # fitted on encoder latents alone it draws an 8-px grid from the LCM's smoother latents.
    polish_steps: int = 0
    # Realism (decoder and polish stages): a PatchGAN critic on decoded DAPI crops adds
    # `adv_weight` x its non-saturating loss and `fm_weight` x feature matching to the
    # reconstruction loss, from `adv_start` (share of the stage's steps; the critic trains from
    # step 0). 0 / 0 = the L1 recipe before it (stages.RealismCritic).
    adv_weight: float = 0.0
    fm_weight: float = 0.0
    # + `grid_weight` x the excess power at the latent grid's period over the truth's (also
    # without a critic: then only this term)
    grid_weight: float = 0.0
    # adversarial distillation: a conditional critic on the decoded one-step output adds
    # `lcm_adv_weight` x its adversarial loss to the LCM stage's loss (0: plain LCD + anchor)
    lcm_adv_weight: float = 0.0
    # pixel-space distillation: + `lcm_pixel_weight` x the reconstruction loss (L1 + gradient L1)
    # of the decoded one-step estimate against the true DAPI. Per pixel, L1 is minimised by the
    # median, a sharp step at the likeliest rim, where the latent anchor's optimum decodes blurry.
    lcm_pixel_weight: float = 0.0
    adv_start: float = 0.2
    adv_ndf: int = 16
    # Teacher levers (issue #24, docs/teacher-diagnosis.md); all off by default, each an ablation arm.
    # classifier-free guidance: the probability that a teacher training sample has its qOBM
    # condition zeroed (the unconditional branch guidance extrapolates away from)
    cond_dropout: float = 0.0
    # min-SNR-γ loss weighting of the teacher's v-loss, min(SNR, γ) / (SNR + 1) (Hang et al.
    # 2023; γ = 5 there); 0 = off (plain MSE). NB: with the zero-terminal-SNR schedule the weight
    # goes to 0 at t = 999, the step one-step sampling queries
    min_snr_gamma: float = 0.0
    # standardise the latents per channel (shift + scale measured on the training set, folded
    # into the VAE encoder's output layer and recorded in the checkpoint configs, so the latent
    # space is zero-mean and unit-variance per channel, as the schedule assumes; needs
    # decoder_steps > 0, the thin decoder is fitted on them); False = one global scale
    unit_latents: bool = False
    # guided consistency distillation: the student gets a guidance input (a sinusoidal
    # w-embedding through a zero-initialised projection, so it starts equal to the teacher);
    # w ~ U[guidance_min, guidance_max] per sample, teacher target uncond + w·(cond - uncond).
    # Needs a teacher trained with cond_dropout > 0. `guidance_default`: the w the network uses
    # when none is given (inference until a guidance control exists, the polish stage)
    guidance_embed: bool = False
    guidance_min: float = 1.0
    guidance_max: float = 3.0
    guidance_default: float = 1.5
    # guided distillation: the zero-initialised guidance projection learns at this multiple of
    # the LCM stage's rate (at the transfer rate it barely moved in 400 steps: w had no effect)
    guidance_lr_mult: float = 10.0
    # > 0: instead of guided consistency distillation (whose bootstrapped target carries the
    # guided teacher's brightness up the 50-step grid far too slowly: w had no effect in 400
    # steps), distil the LCM unguided, then teach a guided copy for this many steps to give in
    # one pass what classifier-free guidance of the LCM itself gives in two, uncond +
    # w·(cond − uncond) with the qOBM zeroed (guidance distillation, Meng et al. 2023)
    guidance_distill_steps: int = 0
    # guided distillation: the anchor to the true latent is weighted by (w_max - w) /
    # (w_max - w_min), full at the lowest guidance (the faithful stain it gives without
    # guidance) and none at the highest (the guided teacher's own crisper target). False: the
    # anchor at every w, which pulls every guidance to the same conditional mean.
    anchor_fade: bool = False
    # Texture decoder (models.Decoder(texture=True)): a second head learns, by Gaussian likelihood
    # of the residual the latent cannot explain (encoder latents only), a per-pixel amplitude of
    # the noise the stain is drawn with. False: the deterministic decoder before it.
    texture: bool = False
    # input normalisation: "robust" (per-image median / MAD, invariant to the phase units) or
    # "fixed" (one training-set mean and std: the recipe before robust normalisation)
    input_norm: str = "robust"
    # blur / noise / gamma on the qOBM crops (training/augment.py); flips and rotations always
    augment: bool = True
    threads: int = 2
    log_every: int = 50
    data_seed_offset: int = 0


#: The layout since release 0.0.2: f=8 latent, 8 channels, a 3-level U-Net 40/80/160, 48-ch VAE.
F8_LAYOUT = dict(
    latent_factor=8, latent_channels=8, unet_channels=(40, 80, 160), vae_channels=48, vae_crop=96
)

PRESETS = {
    # f=8 latent with 8 channels and a 3-level U-Net: the profile in docs/architecture.md puts a
    # 1-step f=4 model at ~2x Pix2Pix's latency, and this layout at ~0.5x for the same parameters.
    "default": TrainPreset(
        name="default",
        **F8_LAYOUT,
        decoder_steps=3000,
        polish_steps=1500,
        # instrument robustness: robust input, augmentation, and fields of which three quarters
        # come from the two fixed presets and a quarter draw a new instrument and tissue per
        # field (simulate.sample_instrument). On the `small` budget a half share lost in-domain
        # F1 (docs/experiments.md, "robust input, augmentation, domain randomisation").
        # Since 0.2.0 three eighths are "tissue-random" fields (simulate.sample_tissue): tissue
        # architecture (glands, sheets, streams, clusters, necrosis), 0.25-1.0 µm/px cameras
        # and a through-focus phase retrieval beside DPC; half stay the two fixed presets so
        # that robustness is not bought with in-domain quality.
        data_presets=("brain-20x", "tumour-dense-20x") * 2
        + ("domain-random",)
        + ("tissue-random",) * 3,
        # 512 fields since 0.1.0 (128 before): with 40 000 teacher steps on 128 fields the
        # teacher began to memorise (LCM-1 F1 -0.011 against 20 000 steps); on 512 fields every
        # accuracy metric rose (F1 +0.022, Pearson +0.025 against release 0.0.7); 768 since
        # 0.2.0, for the wider tissue mix
        n_fields=768,
        # the teacher was under-trained at 10 000 steps (20 000 raised LCM-1 F1 0.259 -> 0.294,
        # release 0.0.7); 40 000 since 0.1.0, with the 512 fields above (docs/experiments.md)
        teacher_steps=40000,
        # realism (issue #14): the decoder draws DAPI-like grain with a learned amplitude; the
        # adversarial variants measured worse (docs/experiments.md, "Realism")
        texture=True,
    ),
    # The recipe of the 0.0.3 weights (runs/v4, commit 458f38a): training-set
    # mean/std input, the two fixed presets, no augmentation. Their configs were then given the
    # robust normalisation by experiments/robust_norm_for_fixed.py (release 0.0.4).
    "v4": TrainPreset(
        name="v4",
        **F8_LAYOUT,
        decoder_steps=3000,
        polish_steps=1500,
        input_norm="fixed",
        augment=False,
    ),
    # The default layout at about a quarter of its steps and half its fields (~15 min of stage
    # time on 2 cores): for ablations on validation seeds before a release training.
    "small": TrainPreset(
        name="small",
        **F8_LAYOUT,
        n_fields=48,
        vae_steps=1000,
        decoder_steps=600,
        teacher_steps=2500,
        lcm_steps=800,
        polish_steps=300,
        pix2pix_steps=800,
    ),
    "tiny": TrainPreset(
        name="tiny",
        n_fields=4,
        field_size=64,
        crop=64,
        vae_crop=32,
        batch=4,
        vae_steps=30,
        teacher_steps=30,
        pix2pix_steps=30,
        lcm_steps=60,
        unet_channels=(8, 16, 16),
        latent_factor=8,
        vae_channels=8,
        decoder_steps=30,
        polish_steps=20,
        dec_quarter_channels=8,
        pix2pix_ngf=8,
        log_every=10,
        threads=1,
    ),
}


#: Transfer (`--init`): every stage starts from trained weights, so the recipe needs far fewer
#: steps and a gentler rate (teacher 1e-4, LCM 2e-5). The VAE stage is skipped (the init's
#: encoder and latent scale are kept). Default: ~1,600 steps, minutes on a laptop CPU instead of
#: the ~25,000 steps (~1 h) of training from scratch. Presets not listed keep their own steps.
TRANSFER = {
    "default": dict(
        decoder_steps=150,
        teacher_steps=600,
        lcm_steps=300,
        polish_steps=150,
        pix2pix_steps=400,
        lr=1e-4,
    ),
    "tiny": dict(lr=1e-4),
}
TRANSFER["v4"] = TRANSFER["small"] = TRANSFER["default"]  # the same networks
#: The release recipe: the packaged networks (VAE and decoder kept) trained on the default
#: preset's data mix, long enough for new data to be learned, not a user's quick transfer.
#: 0.2.0 (`--stages` all, from 0.1.0): decoder 400, teacher 8000, LCM 2500, polish 800, Pix2Pix
#: 1200 steps on 768 fields. 0.3.0 (from 0.2.0, `scripts/train_release.sh`): guidance (issue
#: #24): condition dropout 0.1 in the teacher and the LCM (both learn the unconditional branch),
#: unguided LCD, then guidance distillation into the LCM's guidance input (w ~ U[1, 3]); the
#: default guidance from validation fields (`experiments/ablate_teacher.py`,
#: docs/experiments.md); twice the fields; stages teacher, LCM and polish (decoder and Pix2Pix
#: kept).
PRESETS["release"] = replace(
    PRESETS["default"],
    name="release",
    n_fields=1536,
    cond_dropout=0.1,
    guidance_embed=True,
    guidance_min=1.0,
    guidance_max=3.0,
    guidance_default=1.5,
    guidance_distill_steps=1500,
)
TRANSFER["release"] = dict(
    decoder_steps=400,
    teacher_steps=6000,
    lcm_steps=2500,
    polish_steps=800,
    pix2pix_steps=1200,
    lr=1e-4,
)


def transfer_preset(p: TrainPreset, lcm_config: dict, pix2pix_config: dict | None) -> TrainPreset:
    """`p` with the networks' shapes of the init checkpoints (so their weights load) and the
    transfer step counts of `TRANSFER`."""
    unet = lcm_config["architecture"]["unet"]["kwargs"]
    vae = lcm_config["architecture"]["vae"]["kwargs"]
    shapes = dict(
        latent_channels=int(unet["latent_channels"]),
        latent_factor=int(unet["factor"]),
        unet_channels=tuple(unet["channels"]),
        unet_cond_channels=tuple(unet.get("cond_channels", ())),
        # a guided LCM keeps its guidance input (its weights must load); it may be added
        guidance_embed=bool(unet.get("guidance_embed", False)) or p.guidance_embed,
        vae_channels=int(vae["enc_channels"]),
    )
    if "dec_half_channels" in vae:  # a refitted thin decoder: keep refitting and polishing it
        shapes.update(
            dec_quarter_channels=int(vae["dec_quarter_channels"]),
            dec_half_channels=int(vae["dec_half_channels"]),
            dec_half_conv=bool(vae.get("dec_half_conv", False)),
            # a texture head is kept (its weights must load) and may be added (it starts fresh)
            texture=bool(vae.get("dec_texture", False)) or p.texture,
        )
    else:  # the VAE's own decoder ships: no refit, no polish
        shapes.update(decoder_steps=0, polish_steps=0)
    if pix2pix_config is not None:
        g = pix2pix_config["architecture"]["generator"]["kwargs"]
        shapes.update(pix2pix_ngf=int(g["ngf"]), pix2pix_depth=int(g["depth"]))
    steps = {k: v for k, v in TRANSFER.get(p.name, {}).items() if k not in shapes}
    return replace(p, **steps, **shapes, vae_steps=0)


def get_train_preset(name: str) -> TrainPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
