"""Tiny random-weight diffusers models and pipelines for the test suite: offline, CPU, milliseconds each.

Everything is built from configs (no Hub access): the transformers from the tiny configs of diffusers' own tests,
the tokenizers in memory. Each builder seeds torch's RNG for construction only (inside `torch.random.fork_rng`,
so the caller's global RNG state is left as it was): the same seed gives bitwise-equal weights, and the same
weights, inputs and seed give bitwise-equal outputs on one machine.

- `wan_transformer`, `flux_transformer`: a bare transformer in eval mode; `wan_inputs`, `flux_inputs`: forward
  kwargs for it.
- `wan_pipeline`, `wan_i2v_pipeline`, `flux_pipeline`: whole pipelines (tokenizers, text encoders, VAE, scheduler,
  transformer; for I2V also a CLIP vision encoder and its image processor); `run_wan`, `run_wan_i2v`, `run_flux`
  run one for 2 steps and return a float32 tensor; `random_image` is an I2V input frame. `WAN_CALL`,
  `WAN_I2V_CALL` and `FLUX_CALL` are their default call kwargs.

The tokenizers are word-level with a character fallback: each word of `WORDS` is one token, and any other
alphanumeric word is spelled out in characters (WordPiece `##` pieces), so prompts that differ by one word always
give different token ids, never a shared `[UNK]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

# ---- tokenizers -------------------------------------------------------------------------------------------------

SPECIALS = ("[PAD]", "</s>", "[UNK]", "<s>")  # ids 0..3: T5's pad=0 and eos=1; CLIP uses bos=3, eos=1, pad=0
PAD_ID, EOS_ID, UNK_ID, BOS_ID = range(4)

WORDS = tuple(
    """
    a an the of in on at by with and or to from under over near behind above below into through across
    is are was sitting standing running walking flying jumping sleeping swimming dancing eating reading playing
    cat cats dog dogs bird birds horse fish fox rabbit bear lion tiger wolf owl cow duck frog mouse robot person
    man woman child girl boy astronaut knight wizard dragon car bike boat ship train plane rocket house castle
    tower bridge road street city village forest tree trees flower flowers garden field mountain mountains hill
    river lake sea ocean beach island desert snow rain storm cloud clouds sky sun moon star stars night day
    morning evening sunset sunrise light shadow fire water ice stone wood glass metal sofa chair table bed
    window door room kitchen hat coat book cup ball box
    red orange yellow green blue purple pink white black brown gray golden silver
    big small tall tiny huge old young new happy sad bright dark calm wild cute beautiful
    photo painting drawing sketch render portrait landscape closeup cinematic realistic detailed style
    high quality low blurry sharp wide shot view slow fast motion camera pan zoom video frame
    one two three four five six seven eight nine ten
    """.split()
)
PUNCTUATION = tuple(".,!?;:'\"-()/&")
CHARACTERS = tuple("abcdefghijklmnopqrstuvwxyz0123456789")


def vocab() -> dict[str, int]:
    """The tokenizers' vocabulary: the specials, `WORDS`, punctuation, then characters and `##` continuations."""
    tokens = [*SPECIALS, *WORDS, *PUNCTUATION, *CHARACTERS, *(f"##{c}" for c in CHARACTERS)]
    out: dict[str, int] = {}
    for token in tokens:
        out.setdefault(token, len(out))
    return out


VOCAB_SIZE = 1000  # the text encoders' embedding rows (the vocabulary itself is smaller)


def tokenizer(max_length: int, *, bos: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer over `vocab()`: lowercased, split on whitespace and punctuation, `</s>` appended (and `<s>`
    prepended when `bos`, as CLIP's), padded with `[PAD]` (id 0)."""
    table = vocab()
    assert len(table) <= VOCAB_SIZE
    tok = Tokenizer(models.WordPiece(table, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    single = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="[PAD]",
        eos_token="</s>",
        unk_token="[UNK]",
        bos_token="<s>",
    )


# ---- text and image encoders --------------------------------------------------------------------------------------


def t5_encoder(seed: int = 0) -> T5EncoderModel:
    """A 2-layer T5 encoder, width 32 (stands in for Wan's UMT5 and Flux's T5-XXL)."""
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    return _seeded(seed, lambda: T5EncoderModel(config))


def clip_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A 5-layer CLIP text encoder, width 32, pooling at `</s>` (Flux's pooled prompt embedding)."""
    config = CLIPTextConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # not 2: CLIP then pools at the first </s>, not at the largest token id
        pad_token_id=PAD_ID,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=VOCAB_SIZE,
        hidden_act="gelu",
        projection_dim=32,
    )
    return _seeded(seed, lambda: CLIPTextModel(config))


def clip_image_encoder(seed: int = 0) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A 2-layer CLIP vision encoder, width 4, 32x32 input in 1x1 patches (1025 image tokens), and its processor."""
    config = CLIPVisionConfig(
        hidden_size=4,
        projection_dim=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        intermediate_size=16,
        patch_size=1,
    )
    return _seeded(seed, lambda: CLIPVisionModelWithProjection(config)), CLIPImageProcessor(crop_size=32, size=32)


# ---- transformers -----------------------------------------------------------------------------------------------

WAN_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 256,
    "ffn_dim": 32,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}
WAN_I2V: dict[str, Any] = {"in_channels": 36, "out_channels": 16, "image_dim": 4, "added_kv_proj_dim": 24}
WAN_TEXT_TOKENS = 12  # wan_inputs' text length for T2V; I2V needs exactly 512 (the pipeline's hard-coded split)
WAN_IMAGE_TOKENS = 257  # wan_inputs' image-context length for I2V


def wan_transformer(seed: int = 0, *, i2v: bool = False, layers: int = 2, **overrides: Any) -> WanTransformer3DModel:
    """A tiny WanTransformer3DModel (2 heads x 12, text width 16, 4 latent channels), eval mode.

    `i2v` adds image cross-attention (`in_channels=36, out_channels=16, image_dim=4, added_kv_proj_dim=24`);
    `overrides` replace any config value (the pipelines pass `text_dim=32` and, for T2V, 16 channels).
    """
    config = {**WAN_CONFIG, **(WAN_I2V if i2v else {}), "num_layers": layers, **overrides}
    return _seeded(seed, lambda: WanTransformer3DModel(**config))


def wan_inputs(
    model: WanTransformer3DModel,
    seed: int = 0,
    *,
    text: torch.Tensor | int | None = None,
    image: torch.Tensor | int | None = None,
    t: float = 500,
) -> dict[str, Any]:
    """Forward kwargs for `model`: latents `(1, C, 2, 16, 16)`, `timestep=[t]`, text `(1, 12, text_dim)` (512 tokens
    for an I2V model) and, for I2V, image context `(1, 257, image_dim)`; `return_dict=False`.

    `text` / `image` are the tensor to pass, or the seed of a random one; None uses `seed`. Each part has its own
    random stream, so `wan_inputs(m, 1, text=0)` has other latents than `wan_inputs(m, 0)` and the same text.
    """
    cfg = model.config
    i2v = cfg.image_dim is not None
    latents = _tensor(seed, (1, cfg.in_channels, 2, 16, 16), stream=0)
    text_shape = (1, 512 if i2v else WAN_TEXT_TOKENS, cfg.text_dim)
    kwargs: dict[str, Any] = {
        "hidden_states": latents,
        "timestep": torch.tensor([t]),
        "encoder_hidden_states": _tensor(seed if text is None else text, text_shape, stream=1),
        "return_dict": False,
    }
    if i2v:
        image_shape = (1, WAN_IMAGE_TOKENS, cfg.image_dim)
        kwargs["encoder_hidden_states_image"] = _tensor(seed if image is None else image, image_shape, stream=2)
    return kwargs


FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
}


def flux_transformer(seed: int = 0, layers: int = 1, single_layers: int = 1) -> FluxTransformer2DModel:
    """A tiny FluxTransformer2DModel (2 heads x 16, text width 32, 4 packed latent channels), eval mode."""
    config = {**FLUX_CONFIG, "num_layers": layers, "num_single_layers": single_layers}
    return _seeded(seed, lambda: FluxTransformer2DModel(**config))


def flux_inputs(
    model: FluxTransformer2DModel, seed: int = 0, *, text: torch.Tensor | int | None = None, t: float = 1.0
) -> dict[str, Any]:
    """Forward kwargs for `model`: 16 packed latent tokens (a 4x4 grid), 48 text tokens, pooled text, ids,
    `timestep=[t]` (Flux multiplies it by 1000 itself); `return_dict=False`. `text` as in `wan_inputs`."""
    cfg = model.config
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1] = torch.arange(4)[:, None]
    img_ids[..., 2] = torch.arange(4)[None, :]
    return {
        "hidden_states": _tensor(seed, (1, 16, cfg.in_channels), stream=0),
        "encoder_hidden_states": _tensor(seed if text is None else text, (1, 48, cfg.joint_attention_dim), stream=1),
        "pooled_projections": _tensor(seed, (1, cfg.pooled_projection_dim), stream=2),
        "timestep": torch.tensor([t]),
        "img_ids": img_ids.reshape(16, 3),
        "txt_ids": torch.zeros(48, 3),
        "return_dict": False,
    }


# ---- pipelines --------------------------------------------------------------------------------------------------

WAN_CALL: dict[str, Any] = {
    "height": 16,
    "width": 16,
    "num_frames": 9,
    "num_inference_steps": 2,
    "guidance_scale": 6.0,
    "max_sequence_length": 32,
    "output_type": "pt",
}
WAN_I2V_CALL: dict[str, Any] = {**WAN_CALL, "max_sequence_length": 512}  # 512: the I2V text/image split
FLUX_CALL: dict[str, Any] = {
    "height": 8,
    "width": 8,
    "num_inference_steps": 2,
    "guidance_scale": 5.0,
    "max_sequence_length": 48,
    "output_type": "pt",
}
PROMPT = "a cat sitting on a red sofa"
NEGATIVE_PROMPT = "blurry low quality"


def wan_vae(seed: int = 0) -> AutoencoderKLWan:
    """A tiny Wan VAE: 16 latent channels, 8x spatial and 4x temporal compression."""
    return _seeded(
        seed,
        lambda: AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
    )


def wan_pipeline(seed: int = 0) -> WanPipeline:
    """A tiny WanPipeline (T2V): T5 stand-in, Wan VAE, flow-match scheduler (shift 7), a 2-block transformer."""
    pipe = WanPipeline(
        tokenizer=tokenizer(512),
        text_encoder=t5_encoder(seed),
        vae=wan_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=wan_transformer(seed, text_dim=32, in_channels=16, out_channels=16),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """A tiny WanImageToVideoPipeline (Wan 2.1 I2V, with image cross-attention and a CLIP vision encoder).

    Call it with `max_sequence_length=512` (`WAN_I2V_CALL`): the transformer splits its context at 512 text tokens.
    """
    image_encoder, image_processor = clip_image_encoder(seed)
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer(512),
        text_encoder=t5_encoder(seed),
        vae=wan_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=wan_transformer(seed, i2v=True, text_dim=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A tiny FluxPipeline: CLIP and T5 stand-ins, a 1-channel VAE (no downsampling), a 1+1-block transformer."""
    vae = _seeded(
        seed,
        lambda: AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=1,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip_text_encoder(seed),
        tokenizer=tokenizer(77, bos=True),
        text_encoder_2=t5_encoder(seed),
        tokenizer_2=tokenizer(512),
        transformer=flux_transformer(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int = 0, size: int = 16) -> PIL.Image.Image:
    """A deterministic random RGB image (the I2V pipeline's conditioning frame)."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def run_wan(pipe: WanPipeline, prompt: str = PROMPT, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """Run `pipe` with `WAN_CALL` (overridden by `kwargs`), negative prompt `NEGATIVE_PROMPT`; frames
    `(1, 9, 3, 16, 16)` float32 in [0, 1] (a latent run returns the latents)."""
    call = {"negative_prompt": NEGATIVE_PROMPT, **WAN_CALL, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **call).frames


def run_wan_i2v(
    pipe: WanImageToVideoPipeline,
    prompt: str = PROMPT,
    seed: int = 0,
    image: PIL.Image.Image | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Run `pipe` on `image` (default `random_image(seed)`) with `WAN_I2V_CALL` overridden by `kwargs`; frames
    `(1, 9, 3, 16, 16)` float32 in [0, 1]."""
    call = {"negative_prompt": NEGATIVE_PROMPT, **WAN_I2V_CALL, **kwargs}
    first = random_image(seed) if image is None else image
    return pipe(first, prompt, generator=torch.Generator().manual_seed(seed), **call).frames


def run_flux(pipe: FluxPipeline, prompt: str = PROMPT, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """Run `pipe` with `FLUX_CALL` overridden by `kwargs`; image `(1, 3, 8, 8)` float32 in [0, 1]
    (`output_type="latent"`: the packed latents `(1, 16, 4)`)."""
    call = {**FLUX_CALL, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **call).images


# ---- helpers ----------------------------------------------------------------------------------------------------


M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, build: Callable[[], M]) -> M:
    """`build()` with torch's RNG seeded by `seed` (the caller's RNG state is restored after); eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval()


def _tensor(value: torch.Tensor | int, shape: tuple[int, ...], *, stream: int) -> torch.Tensor:
    """`value` itself, or a standard-normal tensor of `shape` from seed `value` on random stream `stream` (the
    latents, text and image of one seed are drawn from different streams)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.randn(*shape, generator=torch.Generator().manual_seed(value * 1_000_003 + stream))
