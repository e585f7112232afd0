"""Turning request inputs into token ids, off the event loop.

Every tokenizer call the server makes for a request (prompt encoding, chat rendering, /tokenize,
/detokenize, echo text) runs here: the tokenizer on one dedicated thread (so it is never used by
two threads, and a 1 MB prompt does not stop `/health`), chat templates in worker processes
(`ChatTemplateRenderer`: time, memory and output bounded) called from a small thread pool. The
inputs were bounded while parsing (`protocol.RequestLimits`), before any of this work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from engine.server import protocol as P
from engine.server.chat_render import (
    ChatTemplateError,
    ChatTemplateRenderer,
    detect_content_format,
    prepare_messages,
)
from engine.tokenizer import load_tokenizer

__all__ = ["InputProcessor"]

T = TypeVar("T")


class InputProcessor:
    """Owns a tokenizer (used only on its own thread) and the chat-template workers."""

    def __init__(
        self,
        tokenizer_path: Any,
        *,
        trust_remote_code: bool,
        vocab_size: int,
        chat_template: str | None,
        max_prompt_chars: int,
        template_timeout_s: float,
        template_workers: int,
    ) -> None:
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        self.max_prompt_chars = max_prompt_chars
        self._special_tokens = dict(self.tokenizer.special_tokens_map)  # as HF passes them
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tokenizer"
        )
        self._render_threads = concurrent.futures.ThreadPoolExecutor(
            template_workers, thread_name_prefix="chat-template"
        )
        self.renderer = ChatTemplateRenderer(
            num_workers=template_workers, timeout_s=template_timeout_s
        )

    def prestart(self) -> None:
        """Starts a chat-template worker in the background (the first chat request then does
        not wait for it)."""
        self._render_threads.submit(self.renderer.prestart)

    def close(self) -> None:
        self.renderer.close()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        self._render_threads.shutdown(wait=False, cancel_futures=True)

    async def _on_tokenizer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    # ---- prompts ---------------------------------------------------------------------------

    async def encode_prompts(
        self, prompts: list[P.Prompt], need_text: bool
    ) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) per prompt; a token-id prompt's text is decoded only for echo."""
        for prompt in prompts:
            if not isinstance(prompt, str):
                self.check_vocab(prompt, "prompt")
        return await self._on_tokenizer(self._encode_all, prompts, need_text)

    def _encode_all(
        self, prompts: list[P.Prompt], need_text: bool
    ) -> list[tuple[str | None, list[int]]]:
        encoded: list[tuple[str | None, list[int]]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                token_ids = self.tokenizer.encode(prompt)
                if not token_ids:
                    raise P.APIError(
                        "prompt is empty: it must contain at least one token", param="prompt"
                    )
                encoded.append((prompt, token_ids))
            else:
                text = self.tokenizer.decode(prompt) if need_text else None
                encoded.append((text, list(prompt)))
        return encoded

    def check_vocab(self, token_ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < vocab:
                raise P.APIError(
                    f"token id {token_id} is outside the vocabulary [0, {vocab})", param=param
                )

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return await self._on_tokenizer(
            lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        )

    async def token_strs(self, token_ids: list[int]) -> list[str]:
        return await self._on_tokenizer(self.tokenizer.convert_ids_to_tokens, token_ids)

    async def detokenize(self, token_ids: list[int]) -> str:
        self.check_vocab(token_ids, "tokens")
        return await self._on_tokenizer(self.tokenizer.decode, token_ids)

    # ---- chat ------------------------------------------------------------------------------

    async def render_chat(self, chat: P.ChatRequest) -> list[int]:
        """The conversation's prompt token ids (rendered in a worker, tokenized here without
        special tokens, as `apply_chat_template` does); a 400 naming `messages` on failure."""
        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(self._render_threads, self._render, chat)
        except ChatTemplateError as e:
            raise P.APIError(f"Could not apply the chat template: {e}", param="messages") from e
        return await self._on_tokenizer(
            lambda: self.tokenizer.encode(text, add_special_tokens=False)
        )

    def _render(self, chat: P.ChatRequest) -> str:
        kwargs = dict(chat.chat_template_kwargs)
        try:
            template = self.tokenizer.get_chat_template(
                chat.chat_template or self.chat_template, kwargs.get("tools")
            )
        except ValueError as e:  # no template at all
            raise ChatTemplateError(str(e)) from e
        messages = prepare_messages(chat.messages, detect_content_format(template))
        return self.renderer.render(
            messages,
            chat_template=template,
            add_generation_prompt=chat.add_generation_prompt,
            kwargs={**self._special_tokens, **kwargs},
            max_chars=self.max_prompt_chars,
        )
