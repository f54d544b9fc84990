"""The six GPT-2 classes of transformers, with their forward signatures, outputs and losses."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from tritongpt2.engine.generation import generate as engine_generate
from tritongpt2.engine.inputs import INTEGER_DTYPES

from .base import GPT2PreTrainedModel, input_shape
from .labels import class_ids, positions, sequence_labels
from .losses import (
    IGNORE_INDEX,
    LOSS_KEYWORDS,
    causal_lm_loss,
    double_heads_lm_loss,
    question_answering_loss,
    sequence_classification_loss,
    sequence_problem_type,
)
from .outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    GPT2DoubleHeadsModelOutput,
    ModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from .summary import SequenceSummary

# Keyword arguments transformers' forwards take through **kwargs that change nothing here:
# cache_position (positions come from position_ids or the cache's length, as in transformers 5's GPT-2).
IGNORED_KEYWORDS = frozenset({"cache_position"})


def _past(past_key_values: Any, cache: Any) -> Any:
    """transformers 5 renamed past_key_values to cache; both are taken."""
    if past_key_values is not None and cache is not None:
        raise ValueError("give past_key_values or cache, not both")
    return past_key_values if past_key_values is not None else cache


def _keep(logits: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """transformers' slice_logits_to_keep: an int keeps the last n positions (0: all), a tensor the
    positions it lists."""
    if isinstance(logits_to_keep, int):
        return logits[..., -logits_to_keep:, :] if logits_to_keep else logits
    return logits[..., logits_to_keep.to(logits.device), :]


def _kept(logits_to_keep: Any, seq: int) -> int:
    """How many of `seq` positions logits_to_keep keeps; ValueError for one that is not a count or
    positions within the sequence (read on the host)."""
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep} must be >= 0 (0 keeps every position)")
        return min(logits_to_keep, seq) if logits_to_keep else seq
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1 and logits_to_keep.dtype in INTEGER_DTYPES:
        outside = (logits_to_keep < -seq) | (logits_to_keep >= seq)
        if bool(outside.any()):
            raise ValueError(f"logits_to_keep holds {int(logits_to_keep[outside][0])}, not a position of {seq}")
        return logits_to_keep.numel()
    raise ValueError(f"logits_to_keep must be an int or a 1-D tensor of positions, got {logits_to_keep!r}")


class _DropInForward:
    """What every class's forward shares: the trunk's arguments, the extra keyword arguments it
    takes, and the return_dict default."""

    # Keyword arguments beyond the signature that the forward uses (its loss's options).
    extra_keywords: frozenset[str] = frozenset()

    def _extra(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The extra keyword arguments among kwargs; TypeError naming any that is not one."""
        unknown = sorted(set(kwargs) - self.extra_keywords - IGNORED_KEYWORDS)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword arguments: {', '.join(unknown)}")
        return {k: v for k, v in kwargs.items() if k in self.extra_keywords}

    def _trunk(self, **arguments: Any) -> tuple[BaseModelOutputWithPastAndCrossAttentions, torch.Tensor | None]:
        arguments["past_key_values"] = _past(arguments.get("past_key_values"), arguments.pop("cache", None))
        return self._transformer(**arguments)

    def _returned(self, output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        """return_dict=False (or config.return_dict False) gives the tuple of the fields that are not
        None, as transformers does."""
        return output if self._flag("return_dict", return_dict) else output.to_tuple()


class GenerationMixin:
    """generate() over the engine, with the arguments of transformers' generate that it supports."""

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        **unsupported: Any,
    ) -> torch.Tensor:
        """Greedy or sampled continuations, [B, T + new] on the model's device. Defaults follow
        transformers' GenerationConfig: max_length 20 when no max_new_tokens, top_k 50 when sampling.
        `streamer` is a callable or a transformers streamer (put/end)."""
        if num_beams != 1 or num_return_sequences != 1 or unsupported:
            names = sorted(unsupported) + (["num_beams"] if num_beams != 1 else []) + (
                ["num_return_sequences"] if num_return_sequences != 1 else [])
            raise NotImplementedError(f"generate does not support: {', '.join(names)}")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"generate needs input_ids, a torch.Tensor of [batch, seq], got {type(input_ids).__name__}")
        prompt_length = input_ids.shape[-1]
        if max_new_tokens is None:
            max_new_tokens = (max_length if max_length is not None else 20) - prompt_length
            if max_new_tokens < 1:
                raise ValueError(f"max_length={max_length or 20} leaves no room after a prompt of {prompt_length} tokens")
        on_tokens: Callable[[torch.Tensor], None] | None = None
        if streamer is not None and hasattr(streamer, "put"):
            streamer.put(input_ids.cpu())
            on_tokens = streamer.put
        elif streamer is not None:
            on_tokens = streamer
        out = engine_generate(
            self.engine, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=(top_k or 0) if do_sample else 0, top_p=top_p, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, seed=seed, generator=generator, streamer=on_tokens,
        )
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        return out.to(input_ids.device)


class GPT2Model(_DropInForward, GPT2PreTrainedModel):
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        self._extra(kwargs)
        out, _ = self._trunk(
            input_ids=input_ids, past_key_values=past_key_values, cache=cache, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        return self._returned(out, return_dict)


class GPT2LMHeadModel(GenerationMixin, _DropInForward, GPT2PreTrainedModel):
    extra_keywords = LOSS_KEYWORDS

    def head_modules(self) -> dict[str, nn.Module]:
        return {"lm_head": self._tied_lm_head()}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions:
        loss_options = self._extra(kwargs)
        shape = input_shape(input_ids, inputs_embeds)
        kept = _kept(logits_to_keep, shape[-1])
        if labels is not None:
            ignore_index = loss_options.get("ignore_index", IGNORE_INDEX)
            labels = class_ids("labels", labels, shape, self.config.vocab_size, ignore_index=ignore_index)
            if loss_options.get("shift_labels") is not None:
                loss_options["shift_labels"] = class_ids(
                    "shift_labels", loss_options["shift_labels"], shape, self.config.vocab_size, ignore_index=ignore_index
                )
            if kept != shape[-1]:
                raise ValueError(
                    f"labels need the logits of all {shape[-1]} positions, but logits_to_keep={logits_to_keep!r} keeps {kept}"
                )
        out, logits = self._trunk(
            input_ids=input_ids, past_key_values=past_key_values, cache=cache, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            lm_logits=True,
        )
        logits = _keep(logits, logits_to_keep)
        loss = causal_lm_loss(logits, labels, **loss_options) if labels is not None else None
        return self._returned(CausalLMOutputWithCrossAttentions(loss, logits, out.past_key_values, out.hidden_states), return_dict)


class GPT2DoubleHeadsModel(GenerationMixin, _DropInForward, GPT2PreTrainedModel):
    def head_modules(self) -> dict[str, nn.Module]:
        summary = SequenceSummary(self.config, self.engine.activation).to(device=self.device, dtype=self.dtype).requires_grad_(False)
        return {"lm_head": self._tied_lm_head(), "multiple_choice_head": summary}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mc_token_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mc_labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> GPT2DoubleHeadsModelOutput:
        self._extra(kwargs)
        shape = input_shape(input_ids, inputs_embeds)
        if labels is not None:
            labels = class_ids("labels", labels, shape, self.config.vocab_size)
        if mc_token_ids is not None and self.multiple_choice_head.summary_type == "cls_index":
            mc_token_ids = class_ids("mc_token_ids", mc_token_ids, shape[:-1], shape[-1], ignore_index=None)
        if mc_labels is not None:
            *rows, choices = self._mc_logits_shape(shape[:-1])
            mc_labels = class_ids("mc_labels", mc_labels, (math.prod(rows),), choices, exact_shape=False)
        out, logits = self._trunk(
            input_ids=input_ids, past_key_values=past_key_values, cache=cache, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            lm_logits=True, last_hidden=True,
        )
        if mc_token_ids is not None:
            mc_token_ids = mc_token_ids.to(self.device)
        mc_logits = self.multiple_choice_head(out.last_hidden_state, mc_token_ids).squeeze(-1)
        mc_loss = None
        if mc_labels is not None:
            mc_loss = nn.functional.cross_entropy(mc_logits.view(-1, mc_logits.shape[-1]), mc_labels.to(self.device).view(-1))
        loss = double_heads_lm_loss(logits, labels) if labels is not None else None
        output = GPT2DoubleHeadsModelOutput(loss, mc_loss, logits, mc_logits, out.past_key_values, out.hidden_states)
        return self._returned(output, return_dict)

    def _mc_logits_shape(self, choices: tuple[int, ...]) -> tuple[int, ...]:
        """mc_logits' shape for inputs [*choices, T]: the summary's width per choice, squeezed when 1."""
        projection = self.multiple_choice_head.summary
        width = projection.out_features if isinstance(projection, nn.Linear) else self.config.n_embd
        return choices if width == 1 else (*choices, width)


class GPT2ForSequenceClassification(_DropInForward, GPT2PreTrainedModel):
    def head_modules(self) -> dict[str, nn.Module]:
        return {"score": self._new_linear(self.config.n_embd, self.config.num_labels, bias=False)}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        """Pools the last token that is not pad_token_id (the last token when none is set)."""
        self._extra(kwargs)
        batch = input_shape(input_ids, inputs_embeds)[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        problem_type = None
        if labels is not None:
            num_labels = self.config.num_labels
            problem_type = sequence_problem_type(labels, num_labels, self.config.problem_type)
            labels = sequence_labels(labels, problem_type, batch, num_labels, self.dtype)
        out, _ = self._trunk(
            input_ids=input_ids, past_key_values=past_key_values, cache=cache, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        hidden = out.last_hidden_state
        if pad is None or input_ids is None:
            last = torch.full((batch,), hidden.shape[1] - 1, device=hidden.device)
        else:
            not_pad = (input_ids != pad).to(hidden.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=hidden.device, dtype=torch.int32) * not_pad).argmax(-1)
        logits = self.score(hidden[torch.arange(batch, device=hidden.device), last])
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(logits, labels.to(logits.device), self.config.num_labels, problem_type)
            self.config.problem_type = problem_type
        return self._returned(SequenceClassifierOutputWithPast(loss, logits, out.past_key_values, out.hidden_states), return_dict)


class GPT2ForTokenClassification(_DropInForward, GPT2PreTrainedModel):
    def head_modules(self) -> dict[str, nn.Module]:
        return {"classifier": self._new_linear(self.config.n_embd, self.config.num_labels)}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> TokenClassifierOutput:
        self._extra(kwargs)
        if labels is not None:
            shape = input_shape(input_ids, inputs_embeds)
            labels = class_ids("labels", labels, shape, self.config.num_labels, exact_shape=False)
        out, _ = self._trunk(
            input_ids=input_ids, past_key_values=past_key_values, cache=cache, attention_mask=attention_mask,
            token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        logits = self.classifier(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.config.num_labels), labels.to(logits.device).view(-1))
        return self._returned(TokenClassifierOutput(loss, logits, out.hidden_states), return_dict)


class GPT2ForQuestionAnswering(_DropInForward, GPT2PreTrainedModel):
    def head_modules(self) -> dict[str, nn.Module]:
        return {"qa_outputs": self._new_linear(self.config.n_embd, 2)}

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> QuestionAnsweringModelOutput:
        self._extra(kwargs)
        rows = math.prod(input_shape(input_ids, inputs_embeds)[:-1])
        if start_positions is not None:
            start_positions = positions("start_positions", start_positions, rows)
        if end_positions is not None:
            end_positions = positions("end_positions", end_positions, rows)
        out, _ = self._trunk(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            head_mask=head_mask, inputs_embeds=inputs_embeds, use_cache=False, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in self.qa_outputs(out.last_hidden_state).split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return self._returned(QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states), return_dict)


MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (
        GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel, GPT2ForSequenceClassification,
        GPT2ForTokenClassification, GPT2ForQuestionAnswering,
    )
}
