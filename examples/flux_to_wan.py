"""A Flux.1 image stage feeding a Wan 2.1 image-to-video stage, two processes joined by one tiercache root.

    python examples/flux_to_wan.py stage1 --root DIR --prompt "a red fox running through snow"
    python examples/flux_to_wan.py stage2 --root DIR          # may start before stage 1 has finished: it waits
    python examples/flux_to_wan.py both --root DIR            # the two stages as two processes at once

What passes from Flux to Wan: **the image** and **the prompt text**. Stage 1 also keeps, for Flux's own reuse (a
re-run, an upscale pass), the image's **latents** and the **Flux prompt embeddings** (`prompt_embeds`,
`pooled_prompt_embeds`). What cannot pass: Flux's attention K/V, Flux latents and Flux prompt embeddings cannot
feed Wan: the models have different widths, different text encoders (Flux: CLIP + T5-XXL; Wan: umT5-XXL) and
different VAEs, so Wan re-encodes the prompt with its own text encoder and the image with its own VAE and CLIP.

Stage 1 puts, with `write_through=True` (on the root's nvme tier at once, so a second process sees them):

    handoff/<request-id>/image        {"image": float32 (1, 3, H, W) in [0, 1]}
    handoff/<request-id>/latents      {"latents": Flux's packed latents of that image}
    handoff/<request-id>/flux-prompt  {"prompt_embeds", "pooled_prompt_embeds"}
    handoff/<request-id>/prompt       {"text": the prompt's UTF-8 bytes as uint8}   (written last)

Stage 2 polls `cache.keys(prefix="handoff/")` until a request has both its image and its prompt (up to
`--timeout` seconds), runs WanImageToVideoPipeline on them and puts the video under `videos/<request-id>`. Where
`tiercache.integrations.diffusers` is installed, stage 2 also caches Wan's prompt and image embeddings
(`cache_prompts`) and its cross-attention K/V (`cache_context_kv`: the same at every step), so a repeated prompt
or image skips the encoders and the K/V projections, in this process or a later one on the same root.

Without `--flux-model` / `--wan-model` both pipelines are tiny random-weight stand-ins built here (as diffusers'
own tests build them): it runs offline on a CPU in seconds, and the pictures are noise. With
`--flux-model black-forest-labs/FLUX.1-dev --wan-model Wan-AI/Wan2.1-I2V-14B-480P-Diffusers` and a GPU it loads
the real models with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import torch

import tiercache

PREFIX = "handoff/"
PASSES = "passes from Flux to Wan: the image and the prompt text"
STAYS = "kept for Flux's own reuse only: the latents and the Flux prompt embeddings"
CANNOT = "Flux's K/V, latents and prompt embeddings cannot feed Wan: different widths, text encoders and VAEs"


# ---- tiny random components (offline) ------------------------------------------------------------------------------


def tiny_tokenizer(max_length: int, *, bos: bool = False) -> Any:
    """An in-memory tokenizer: a few whole words plus single characters (`##` pieces), so any two different words
    get different ids; `</s>` appended (and `<s>` prepended for CLIP)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = "a an the of in on with and cat dog fox bird red blue green white snow sea sky running sitting".split()
    tokens = ["[PAD]", "</s>", "[UNK]", "<s>", *words, *".,!?;:'\"-()", *chars, *(f"##{c}" for c in chars)]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>" if bos else "$A </s>", special_tokens=[("<s>", 3), ("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="[PAD]",
        eos_token="</s>",
        unk_token="[UNK]",
        bos_token="<s>",
    )


def tiny_t5(seed: int) -> Any:
    """A 2-layer T5 encoder of width 32 (Flux's T5-XXL and Wan's umT5 stand in)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=1000,
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_flux(seed: int = 0) -> Any:
    """A FluxPipeline of tiny random components: CLIP + T5 text encoders, a 1-channel VAE, a 1+1-block model."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=3,
            eos_token_id=1,  # pooled at the first </s> (eos_token_id=2 would pool at the largest token id)
            pad_token_id=0,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=1000,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    vae = AutoencoderKL(
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
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=tiny_tokenizer(77, bos=True),
        text_encoder_2=tiny_t5(seed),
        tokenizer_2=tiny_tokenizer(512),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_i2v(seed: int = 0) -> Any:
    """A WanImageToVideoPipeline (Wan 2.1 I2V) of tiny random components, with image cross-attention."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=4,
        added_kv_proj_dim=24,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=1,
        )
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=tiny_tokenizer(512),
        text_encoder=tiny_t5(seed),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=image_encoder.eval(),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the two stages -------------------------------------------------------------------------------------------


def open_cache(args: argparse.Namespace) -> tiercache.TierCache:
    return tiercache.TierCache(root=args.root, policy=args.policy, device=args.device)


def say(stage: str, line: str) -> None:
    print(f"[{stage}] {line}", flush=True)


def stage1(args: argparse.Namespace) -> None:
    """Make the image with Flux and put it, its latents, the Flux prompt embeddings and the prompt text."""
    rid = args.request_id or uuid.uuid4().hex[:12]
    if args.flux_model:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(args.flux_model, torch_dtype=torch.bfloat16).to(args.device)
        call = {"height": args.height or 1024, "width": args.width or 1024, "num_inference_steps": args.steps or 28}
        call |= {"guidance_scale": 3.5, "max_sequence_length": 512}
    else:
        pipe = tiny_flux(args.seed)
        call = {"height": args.height or 16, "width": args.width or 16, "num_inference_steps": args.steps or 2}
        call |= {"guidance_scale": 5.0, "max_sequence_length": 48}
    say("stage1", f"request {rid}: Flux {'from ' + args.flux_model if args.flux_model else '(tiny, random)'}")

    # The prompt is encoded once; the pipeline then runs from the embeddings (and stage 1 keeps them for Flux).
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            args.prompt, prompt_2=None, device=args.device, max_sequence_length=call["max_sequence_length"]
        )
    final: dict[str, torch.Tensor] = {}

    def keep_latents(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        final["latents"] = kwargs["latents"]  # after the last step: the latents the VAE decodes
        return kwargs

    image = pipe(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        output_type="pt",
        callback_on_step_end=keep_latents,
        **call,
    ).images
    with open_cache(args) as cache:
        base = f"{PREFIX}{rid}/"
        cache.put(base + "image", {"image": image.float()}, write_through=True)
        cache.put(base + "latents", {"latents": final["latents"]}, write_through=True)
        cache.put(
            base + "flux-prompt",
            {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled},
            write_through=True,
        )
        text = torch.tensor(list(args.prompt.encode("utf-8")), dtype=torch.uint8)
        cache.put(base + "prompt", {"text": text}, write_through=True)  # last: the request is complete
        say("stage1", f"put {base}image {tuple(image.shape)} and {base}prompt ({text.numel()} bytes): {PASSES}")
        say(
            "stage1",
            f"put {base}latents {tuple(final['latents'].shape)} and {base}flux-prompt "
            f"{tuple(prompt_embeds.shape)} + {tuple(pooled.shape)}: {STAYS}",
        )
        say("stage1", CANNOT)
    say("stage1", "cache closed")


def wait_for_request(cache: tiercache.TierCache, rid: str | None, timeout: float) -> str:
    """The id of a request whose image and prompt are both in the cache (the first without a video yet, when
    `rid` is None), polling until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        keys = set(cache.keys(prefix=PREFIX))
        ready = sorted(k[len(PREFIX) : -len("/prompt")] for k in keys if k.endswith("/prompt"))
        ready = [r for r in ready if f"{PREFIX}{r}/image" in keys]
        if rid is not None:
            if rid in ready:
                return rid
        else:
            fresh = [r for r in ready if f"videos/{r}" not in cache]
            if fresh:
                return fresh[0]
        if time.monotonic() > deadline:
            wanted = f"request {rid}" if rid else "new request (one without a video)"
            raise TimeoutError(f"stage2: no {wanted} under {PREFIX} in {cache.root} after {timeout:g} s")
        time.sleep(0.1)


def to_pil(image: torch.Tensor) -> Any:
    """A (1, 3, H, W) float image in [0, 1] as a PIL image (how diffusers' image processors want it)."""
    import PIL.Image

    array = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return PIL.Image.fromarray(array)


def stage2(args: argparse.Namespace) -> None:
    """Wait for a request, then make its video with Wan I2V from the image and the prompt text."""
    if args.wan_model:
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
        from transformers import CLIPVisionModel

        image_encoder = CLIPVisionModel.from_pretrained(
            args.wan_model, subfolder="image_encoder", torch_dtype=torch.float32
        )
        vae = AutoencoderKLWan.from_pretrained(args.wan_model, subfolder="vae", torch_dtype=torch.float32)
        pipe = WanImageToVideoPipeline.from_pretrained(
            args.wan_model, vae=vae, image_encoder=image_encoder, torch_dtype=torch.bfloat16
        ).to(args.device)
        call = {"height": args.height or 480, "width": args.width or 832, "num_frames": args.frames or 81}
        call |= {"num_inference_steps": args.steps or 40, "guidance_scale": 5.0}
    else:
        pipe = tiny_wan_i2v(args.seed)
        call = {"height": args.height or 16, "width": args.width or 16, "num_frames": args.frames or 9}
        call |= {"num_inference_steps": args.steps or 2, "guidance_scale": 6.0}
    # 512: the text length the I2V transformer's cross-attention splits its context at (hard-coded in diffusers)
    call["max_sequence_length"] = 512
    say("stage2", f"Wan I2V {'from ' + args.wan_model if args.wan_model else '(tiny, random)'}; waiting for a request")

    with open_cache(args) as cache:
        rid = wait_for_request(cache, args.request_id, args.timeout)
        base = f"{PREFIX}{rid}/"
        image = cache[base + "image"]["image"]
        prompt = bytes(cache[base + "prompt"]["text"].cpu().tolist()).decode("utf-8")
        say("stage2", f"request {rid}: got {base}image {tuple(image.shape)} and the prompt {prompt!r}: {PASSES}")
        say("stage2", f"not read: {base}latents and {base}flux-prompt; {CANNOT}")

        handles: list[Any] = []
        # tiercache.integrations.diffusers (optional): Wan's prompt and image embeddings, and its cross-attention
        # K/V, computed once per prompt / image and kept in the cache for every later step, branch and process.
        try:
            from tiercache.integrations.diffusers import cache_context_kv, cache_prompts
        except ImportError as exc:
            say("stage2", f"tiercache.integrations.diffusers not available ({exc}); running uncached")
        else:
            handles = [
                cache_prompts(pipe, cache, write_through=True),
                cache_context_kv(pipe.transformer, cache, write_through=True),
            ]
        try:
            with torch.no_grad():
                video = pipe(
                    to_pil(image),
                    prompt,
                    negative_prompt=args.negative_prompt,
                    generator=torch.Generator(device="cpu").manual_seed(args.seed),
                    output_type="pt",
                    **call,
                ).frames
        finally:
            for handle in handles:
                say("stage2", f"{type(handle).__name__}: {handle.hits} hits, {handle.misses} misses")
                handle.remove()
        cache.put(f"videos/{rid}", {"video": video.float()}, write_through=True)
        say("stage2", f"video {tuple(video.shape)} (batch, frames, channels, height, width) put as videos/{rid}")
        if args.out:
            torch.save(video, args.out)
            say("stage2", f"saved {args.out}")
    say("stage2", "cache closed")


def both(args: argparse.Namespace) -> int:
    """Stage 1 and stage 2 as two processes started together on one root; stage 2 waits for stage 1's request."""
    rid = args.request_id or uuid.uuid4().hex[:12]
    common = ["--root", args.root, "--request-id", rid, "--seed", str(args.seed), "--policy", args.policy]
    common += ["--device", args.device]
    for name in ("height", "width", "steps"):
        if getattr(args, name):
            common += [f"--{name}", str(getattr(args, name))]
    first = [*common, "--prompt", args.prompt] + (["--flux-model", args.flux_model] if args.flux_model else [])
    second = [*common, "--timeout", str(args.timeout), "--negative-prompt", args.negative_prompt]
    second += (["--wan-model", args.wan_model] if args.wan_model else []) + (["--out", args.out] if args.out else [])
    second += ["--frames", str(args.frames)] if args.frames else []
    me = [sys.executable, os.path.abspath(__file__)]
    start = time.perf_counter()
    procs = [subprocess.Popen([*me, "stage2", *second]), subprocess.Popen([*me, "stage1", *first])]
    codes = [p.wait() for p in procs]
    print(f"[both] stage1 exit {codes[1]}, stage2 exit {codes[0]}, {time.perf_counter() - start:.1f} s", flush=True)
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["stage1", "stage2", "both"])
    parser.add_argument("--root", required=True, help="the tiercache root both stages open")
    parser.add_argument("--prompt", default="a red fox running through the snow")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--request-id", help="stage 1: the id to put under (default: a new one); stage 2: to wait for")
    parser.add_argument("--flux-model", help="a FluxPipeline to load (e.g. black-forest-labs/FLUX.1-dev)")
    parser.add_argument(
        "--wan-model", help="a WanImageToVideoPipeline to load (e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--policy", default="auto", help="the cache's policy: a preset name or a TOML file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int, help="Wan's number of frames")
    parser.add_argument("--steps", type=int, help="denoising steps (each stage)")
    parser.add_argument("--timeout", type=float, default=300.0, help="stage 2: seconds to wait for a request")
    parser.add_argument("--out", help="stage 2: also torch.save the video tensor here")
    args = parser.parse_args(argv)
    if args.stage == "both":
        return both(args)
    try:
        (stage1 if args.stage == "stage1" else stage2)(args)
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
