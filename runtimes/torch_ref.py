"""The transformers reference: a merged Hugging Face checkpoint run with torch, as transformers runs it.

The only module of ``xpack.runtimes`` that imports torch/transformers (inside functions). Text models
load with ``AutoModelForCausalLM``; checkpoints whose architecture ends in
``ForConditionalGeneration`` (Gemma 3 / MedGemma, Llama 3.2 Vision) with
``AutoModelForImageTextToText`` + ``AutoProcessor``, and then take an image too.
Generation is ``model.generate`` with a synchronous streamer that timestamps the first token.

With ``peft=PeftOnBase(...)`` the folder is a base model and the runtime is the model as trained:
PEFT's ``PeftModel`` with the adapters unmerged on top of the base, the base either as stored or, for
a QLoRA adapter, loaded 4-bit by bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)``) with float32
compute, as training ran it (issue #15). ``xpack verify --reference-base`` uses it as the reference.
It is an option of this runtime, not a runtime of its own: it shares the tokenizer, chat template,
generation and logits of the merged checkpoint's reference, so the two references differ only in the
model, and ``runtimes/bench.py`` can benchmark it in a process of its own.

The dtype is the profile's ``compute_dtype``, except float16 for an architecture whose table says its
activations overflow it (``fp16_overflows``: Gemma 3, whose residual stream passes 65504 and turns the
logits into NaN): bfloat16 (the same memory) on a GPU that has it, float32 elsewhere (a T4, a CPU).
``info()["dtype"]`` says which ran, and ``notes`` why.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from xpack.errors import XpackError
from xpack.paths import temp_dir
from xpack.runtimes.base import Runtime, context_room
from xpack.runtimes.chat import END_OF_TURN_TOKENS, ChatTemplate
from xpack.runtimes.heap import map_large_allocations
from xpack.runtimes.messages import load_image
from xpack.runtimes.settings import GenerationSettings, StopGeneration, timing_fields
from xpack.runtimes.torch_offload import (
    chunk_vision_attention,
    concrete_class,
    describe,
    return_freed_memory,
    stored_tables,
    streamed_device_map,
    with_stored_tables,
)

__all__ = ["PeftOnBase", "TorchRuntime", "overflows_fp16"]

QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit types (BitsAndBytesConfig.bnb_4bit_quant_type)
# The architecture tables are packager data (packager/archs/*.json) shipped in the same wheel. runtimes/
# never imports packager/, so the one fact this runtime needs (``fp16_overflows``) is read from the JSON.
ARCH_TABLES = Path(__file__).resolve().parent.parent / "packager" / "archs"


@dataclass(frozen=True)
class PeftOnBase:
    """PEFT adapters, unmerged, over a base: bitsandbytes 4-bit (``quant_type``) or as stored (None)."""

    adapters: tuple[str, ...]
    quant_type: str | None = None
    double_quant: bool = False

    def __post_init__(self):
        if not self.adapters:
            raise XpackError("the as-trained reference needs at least one adapter")
        if self.quant_type not in (None, *QUANT_TYPES):
            raise XpackError(f"unknown 4-bit type {self.quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
        if self.double_quant and self.quant_type is None:
            raise XpackError("double quantization describes a 4-bit base; give the 4-bit type (nf4 or fp4) too")

    def describe(self, base) -> str:
        """One line naming the model, e.g. for a card: which adapters over which base, computed how."""
        adapters = ", ".join(map(str, self.adapters))
        if self.quant_type is None:
            return f"PeftModel({adapters}) unmerged on the 16-bit base {base}"
        double = " double-quant" if self.double_quant else ""
        return f"PeftModel({adapters}) on the bitsandbytes {self.quant_type}{double} 4-bit base {base}, fp32 compute"


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise XpackError(f"{folder}/config.json is unreadable ({exc}); pass a Hugging Face checkpoint folder") from None


def overflows_fp16(config: dict) -> bool:
    """Whether the architecture table of ``config`` (found as packager/archs ``find_arch`` finds it: by
    model class, then model_type) says ``fp16_overflows``; False for an architecture without a table."""
    tables = []
    for path in sorted(ARCH_TABLES.glob("*.json")):
        try:
            tables.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    classes = config.get("architectures") or []
    table = next((t for c in classes for t in tables if c in t.get("architectures", ())), None)
    if table is None:
        table = next((t for t in tables if config.get("model_type") in t.get("model_types", ())), None)
    return bool(table and table.get("fp16_overflows"))


def _switch_off_bf16_cpu_path(model) -> None:
    """bitsandbytes 0.50.2's Linear4bit, in eval mode on a CPU with AVX512-BF16, repacks its weight and computes
    in bfloat16 with a bfloat16 absmax; training ran (and the reference runs) the float32 path."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


class _Streamer:
    """transformers' streamer protocol (``put``/``end``), decoding incrementally and timing the first token."""

    def __init__(self, tokenizer, on_token, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.printed = 0
        self.first: float | None = None
        self.skip_prompt = True
        self.stopped = False
        self.reason: str | None = None  # set when on_token raised StopGeneration

    def put(self, value) -> None:
        if self.skip_prompt:  # generate() first hands over the prompt
            self.skip_prompt = False
            return
        if self.first is None:
            self.first = time.perf_counter()
        for token in value.reshape(-1).tolist():
            if self.stopped:
                return
            if token in self.stop_ids:
                self.stopped = True
                return
            self.ids.append(token)
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait
            return
        piece = text[self.printed :]
        self.printed = len(text)
        if piece and self.on_token is not None and not self.stopped:
            try:
                self.on_token(piece)
            except StopGeneration as stop:  # a stop string, or the caller went away: generate() stops at the next step
                self.stopped, self.reason = True, stop.reason

    def end(self) -> None:
        self._emit(final=True)

    def stopping_criteria(self):
        """transformers' stopping criterion that ends ``generate`` once an ``on_token`` call asked to stop."""
        from transformers import StoppingCriteria

        streamer = self

        class AskedToStop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                import torch

                return torch.full((input_ids.shape[0],), streamer.stopped and streamer.reason is not None, dtype=torch.bool, device=input_ids.device)

        return AskedToStop()


def _openai_penalties(settings: GenerationSettings, prompt_tokens: int):
    """OpenAI's frequency/presence penalties over the generated ids (runtimes/penalties.py's arithmetic) as a
    transformers logits processor; None when both are 0."""
    if settings.frequency_penalty == 0 and settings.presence_penalty == 0:
        return None
    from transformers import LogitsProcessor

    class Penalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            import torch

            for row in range(input_ids.shape[0]):
                ids, counts = torch.unique(input_ids[row, prompt_tokens:], return_counts=True)
                if ids.numel():
                    scores[row, ids] -= counts.to(scores.dtype) * settings.frequency_penalty + settings.presence_penalty
            return scores

    return Penalties()


def _require_matching_weights(folder: Path, architecture: str, loading: dict) -> None:
    """The reference every parity figure stands on runs only the checkpoint's own weights: transformers fills a missing
    weight with random values (and warns), which answered random text (issue #14)."""
    missing, unexpected = list(loading.get("missing_keys") or []), list(loading.get("unexpected_keys") or [])
    if missing or unexpected:
        parts = [f"{len(m)} {what} (e.g. {m[0]})" for m, what in ((missing, "missing"), (unexpected, "unexpected")) if m]
        raise XpackError(f"the weights of {folder} do not match {architecture}: {' and '.join(parts)}; transformers would fill the "
                         "missing ones with random values. Use a checkpoint saved by transformers or `xpack merge`")


class TorchRuntime(Runtime):
    name = "torch"
    formats = ("torch",)

    def __init__(self, artifact, profile, peft: PeftOnBase | None = None, max_memory: int | None = None):
        self.peft = peft
        self.max_memory = max_memory  # bytes of weights a CPU reference may hold; the rest streams (torch_offload.py)
        self._offload_dir = None
        self._load_class = None  # set when a streamed model holds its tables in 16 bits (torch_offload.with_stored_tables)
        self.streamed: str | None = None  # set when its layers stream from disk (_streamed_options): one line for the report
        super().__init__(artifact, profile)

    @staticmethod
    def locate(path) -> Path:
        path = Path(path)
        if not (path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))):
            raise XpackError(f"the torch runtime cannot load {path}: it runs Hugging Face checkpoint folders (config.json + *.safetensors)")
        return path

    def _load(self) -> None:
        try:
            import torch
            import transformers
            from safetensors import SafetensorError
        except ImportError as exc:
            raise XpackError(f"the torch runtime needs torch and transformers ({exc}); install them with `pip install 'xpack[pack]'`") from None
        from transformers.utils import logging as hf_logging

        self._torch = torch
        profile = self.profile
        if profile.device == "cuda" and not torch.cuda.is_available():
            raise XpackError(f"profile {profile.name} runs on a CUDA GPU, but this torch has no CUDA device; use --profile cpu16")
        self.device = torch.device("cuda" if profile.device == "cuda" else "cpu")
        self._previous_threads = torch.get_num_threads()
        if profile.threads:
            torch.set_num_threads(profile.threads)

        folder = self.locate(self.artifact)
        config = _read_config(folder)
        self.dtype = self._compute_dtype(config)
        architectures = config.get("architectures") or []
        self.architecture = architectures[0] if architectures else config.get("model_type", "?")
        self.is_vision = self.architecture.endswith("ForConditionalGeneration")
        kwargs = {"dtype": self.dtype, "local_files_only": True}
        if config.get("model_type") == "gemma2":  # soft-capping is honoured by the eager path only
            kwargs["attn_implementation"] = "eager"
        if self.peft is not None and self.peft.quant_type is not None:
            kwargs.update(self._four_bit_options())
        elif self.max_memory is not None and self.device.type == "cpu":
            kwargs.update(self._streamed_options(transformers.AutoModelForImageTextToText if self.is_vision else transformers.AutoModelForCausalLM, folder))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                # a streamed model's device map names the direct parameters of a module that holds layers (Mllama's
                # class_embedding): transformers places them by name, accelerate's dispatch warns that they are no module
                warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
                model_class = self._load_class or (transformers.AutoModelForImageTextToText if self.is_vision else transformers.AutoModelForCausalLM)
                self.model, loading = model_class.from_pretrained(str(folder), output_loading_info=True, **kwargs)
                if self.is_vision:
                    self.processor = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
                    self.tokenizer = self.processor.tokenizer
                else:
                    self.processor = None
                    self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # SafetensorError: e.g. a truncated file
            raise XpackError(f"transformers could not load {folder} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                             "check that its safetensors files are complete") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        _require_matching_weights(folder, self.architecture, loading)
        if "device_map" not in kwargs:  # a 4-bit or streamed model is placed by its device_map and cannot be moved
            self.model.to(self.device)
        if self.streamed:  # within a memory budget: the vision tower attends one head at a time (the same numbers)
            chunk_vision_attention(self.model)
        if self.peft is not None:
            self.model = self._with_adapters(self.model, folder)
        self.model.eval()
        self.accepts_images = self.is_vision
        self.stop_ids = self._end_of_turn_ids()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _compute_dtype(self, config: dict):
        """The profile's dtype, unless it is float16 and the architecture overflows it (see the module docstring)."""
        torch = self._torch
        dtype = getattr(torch, self.profile.compute_dtype)
        if dtype is not torch.float16 or not overflows_fp16(config):
            return dtype
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):  # Ampere and newer, not a T4
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
        name = str(dtype).replace("torch.", "")
        self.notes.append(f"float16 overflows {'/'.join(config.get('architectures') or [config.get('model_type', '?')])}'s activations "
                          f"(its architecture table says fp16_overflows): the torch reference runs {name}")
        return dtype

    def _four_bit_options(self) -> dict:
        """from_pretrained's options for the 4-bit base as QLoRA training loads it: float32 compute and
        float32 non-quantized parts (fp16 ones turn real Gemma 3's logits into NaN, issue #15)."""
        torch = self._torch
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise XpackError(
                f"the {self.peft.quant_type} 4-bit reference needs bitsandbytes, which is not installed; pip install 'xpack[pack]'"
            ) from None
        from transformers import BitsAndBytesConfig

        self.dtype = torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.peft.quant_type,
                                    bnb_4bit_use_double_quant=self.peft.double_quant, bnb_4bit_compute_dtype=torch.float32)
        return {"quantization_config": config, "device_map": self.device.type, "dtype": torch.float32}

    def _streamed_options(self, model_class, folder: Path) -> dict:
        """from_pretrained's options that keep the weights within ``max_memory``: none when the model fits."""
        import logging

        tables = stored_tables(folder, self.dtype)
        device_map = streamed_device_map(model_class, folder, self.dtype, self.max_memory, tables)
        if device_map is None:
            return {}
        if tables is not None:
            self._load_class = with_stored_tables(concrete_class(model_class, folder), tables)
        map_large_allocations()
        if self.peft is not None:  # PEFT 0.18 fails on an offloaded base (KeyError in its hook handling)
            raise XpackError(f"the as-trained reference (PEFT over {folder}) does not fit in {self.max_memory / 1e9:.1f} GB and cannot stream its "
                             "layers from disk; verify against the merged checkpoint (--reference, from `xpack merge`), which can")
        self.streamed = describe(device_map)
        self.notes.append(f"the torch reference holds at most {self.max_memory / 1e9:.2f} GB of weights: {self.streamed}")
        logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)  # its "parameters on the meta device" is the plan here
        self._offload_dir = temp_dir("offload")  # safetensors sources are read in place; kept for others
        return {"device_map": device_map, "offload_folder": self._offload_dir.name}

    def _with_adapters(self, model, folder: Path):
        """PeftModel over ``model`` with every adapter active (their deltas add up, as in a merge of several)."""
        from peft import PeftModel

        names = [f"adapter{i}" for i in range(len(self.peft.adapters))]
        try:
            peft_model = PeftModel.from_pretrained(model, str(self.peft.adapters[0]), adapter_name=names[0])
            for name, adapter in zip(names[1:], self.peft.adapters[1:]):
                peft_model.load_adapter(str(adapter), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise XpackError(f"PEFT could not put the adapters {', '.join(map(str, self.peft.adapters))} on {folder} ({first})") from None
        if len(names) > 1:
            peft_model.base_model.set_adapter(names)
        _switch_off_bf16_cpu_path(peft_model)
        return peft_model

    @property
    def n_ctx(self) -> int:
        """The profile's context, within the positions the model has (``max_position_embeddings``)."""
        text_config = getattr(self.model.config, "text_config", None) or self.model.config
        positions = getattr(text_config, "max_position_embeddings", None)
        return min(self.profile.n_ctx, int(positions)) if positions else self.profile.n_ctx

    def _end_of_turn_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.model.config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        vocab = self.tokenizer.get_vocab()
        for text in END_OF_TURN_TOKENS:
            if text in vocab:
                ids.add(vocab[text])
        return ids

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self.model = None
        if self._offload_dir is not None:
            self._offload_dir.cleanup()
            self._offload_dir = None
        torch = self._torch
        torch.set_num_threads(self._previous_threads)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return_freed_memory()

    # -- text --------------------------------------------------------------------------------------

    @property
    def _templater(self):
        return self.processor if self.processor is not None and getattr(self.processor, "chat_template", None) else self.tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._templater, "chat_template", None))

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise XpackError(f"{self.artifact} has no chat template; add chat_template.jinja or a tokenizer_config.json chat_template")
        # The template transformers chose, rendered by xpack's bounded sandbox (runtimes/chat.py) instead of
        # apply_chat_template's: the same output, but a hostile template cannot run for ever or fill the memory.
        template = self._templater.chat_template
        if isinstance(template, dict):  # named templates: transformers renders "default"
            template = template.get("default") or next(iter(template.values()))
        special = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        return ChatTemplate(template, special).render(messages, add_generation_prompt)

    def _adds_special(self, text: str) -> bool:
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self._adds_special(text))["input_ids"])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # -- generation --------------------------------------------------------------------------------

    def _inputs(self, text: str, image):
        torch = self._torch
        if image is not None:
            enc = self.processor(text=text, images=[image], add_special_tokens=self._adds_special(text), return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            return inputs
        ids = torch.tensor([self.tokenize(text)], dtype=torch.long, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _generation_config(self, settings: GenerationSettings, max_new: int):
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max_new
        config.max_length = None
        config.min_new_tokens = max_new if settings.ignore_eos else None  # benchmarks: exactly max_new tokens
        config.min_length = 0
        config.num_beams = 1
        config.repetition_penalty = float(settings.repetition_penalty)
        config.eos_token_id = None if settings.ignore_eos else (sorted(self.stop_ids) or None)
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (sorted(self.stop_ids) or [0])[0]
        if settings.greedy:
            config.do_sample = False
            config.temperature = None
            config.top_p = None
            config.top_k = None
        else:
            config.do_sample = True
            config.temperature = float(settings.temperature)
            config.top_p = float(settings.top_p)
            config.top_k = int(settings.top_k) if settings.top_k else None
        config.min_p = None
        config.typical_p = None
        if config.cache_implementation == "hybrid":  # deprecated; transformers infers the layer structure
            config.cache_implementation = None
        return config

    def _generate(self, text, settings: GenerationSettings, image, on_token) -> dict:
        if self.model is None:
            raise XpackError("this runtime was closed; load the artifact again")
        torch = self._torch
        inputs = self._inputs(text, image)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        config = self._generation_config(settings, min(settings.max_tokens, context_room(prompt_tokens, self.n_ctx, self.profile.name)))
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed_all(settings.seed)
        streamer = _Streamer(self.tokenizer, on_token, set() if settings.ignore_eos else self.stop_ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            # use_model_defaults=False: the config already starts from the model's own; without it,
            # transformers would turn do_sample=False back into a model default of do_sample=True.
            from transformers import LogitsProcessorList, StoppingCriteriaList

            penalties = _openai_penalties(settings, prompt_tokens)
            output = self.model.generate(**inputs, generation_config=config, streamer=streamer, use_model_defaults=False,
                                         stopping_criteria=StoppingCriteriaList([streamer.stopping_criteria()]),
                                         logits_processor=LogitsProcessorList([penalties] if penalties else []))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        end = time.perf_counter()
        generated = output[0, prompt_tokens:].tolist()
        steps = len(generated)
        finish = (streamer.reason or "stop") if streamer.stopped else "length"
        answer = self.tokenizer.decode(streamer.ids, skip_special_tokens=True)
        return timing_fields(
            text=answer, prompt_tokens=prompt_tokens, completion_tokens=len(streamer.ids), steps=steps,
            start=start, first=streamer.first, end=end, finish_reason=finish, token_ids=streamer.ids,
        )

    # -- parity ------------------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]):
        if self.model is None:
            raise XpackError("this runtime was closed; load the artifact again")
        torch = self._torch
        ids = [int(t) for t in token_ids]
        if not ids:
            raise XpackError("logits needs at least one token id")
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        return out.logits[0].float().cpu().numpy()

    def logits_with_image(self, prompt: "str | Sequence[dict]", image, continuation_ids: Sequence[int] | None = None):
        """Teacher-forced logits of the text after the (last) image token, as the llama.cpp runtime's method.

        Returns ``(logits, token_ids)``: float32 [n, vocab] and the text token ids after the image.
        """
        if self.model is None:
            raise XpackError("this runtime was closed; load the artifact again")
        if not self.accepts_images:
            raise XpackError(self.image_refusal())
        torch = self._torch
        picture = load_image(image) if not hasattr(image, "convert") else image
        inputs = self._inputs(self.prompt_text(prompt, image=picture), picture)
        if continuation_ids:
            extra = torch.tensor([list(continuation_ids)], dtype=torch.long, device=self.device)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            for key in ("attention_mask", "cross_attention_mask", "token_type_ids"):
                if key in inputs and inputs[key].shape[1] == inputs["input_ids"].shape[1] - extra.shape[1]:
                    tail = inputs[key][:, -1:].expand(-1, extra.shape[1], *inputs[key].shape[2:]) if key == "cross_attention_mask" else (
                        torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra))
                    inputs[key] = torch.cat([inputs[key], tail], dim=1)
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False).logits[0].float().cpu().numpy()
        ids = inputs["input_ids"][0].tolist()
        image_id = getattr(self.model.config, "image_token_index", None) or getattr(self.model.config, "image_token_id", None)
        positions = [i for i, t in enumerate(ids) if t == image_id]
        if not positions:
            raise XpackError("the processor put no image token in the prompt; the chat template cannot take image parts")
        start = positions[-1] + 1
        return logits[start:], ids[start:]

    def peak_gpu_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return self._torch.cuda.max_memory_allocated(self.device) / 2**20

    def info(self) -> dict:
        return {
            "model": self.peft.describe(self.artifact) if self.peft else f"the checkpoint {self.artifact}",
            "architecture": self.architecture,
            "vision": self.is_vision,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),  # the dtype that ran (see _compute_dtype)
            "profile_dtype": self.profile.compute_dtype,
            "vocab_size": self.vocab_size,
            "stop_ids": sorted(self.stop_ids),
            "streamed": getattr(self, "streamed", None),  # None: the whole model was in memory
        }
