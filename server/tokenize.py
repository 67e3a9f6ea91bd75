"""vLLM's tokenizer endpoints: /tokenize (a prompt, or chat messages through the chat
template) and /detokenize, with the served model's tokenizer (adapters share the base's)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import generation as g
from server.chat import render
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.state import get_state

router = APIRouter()


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    state.adapter_for(req.model)  # 404 for a model that is not served, as the other endpoints
    tok = state.engine.tokenizer
    if req.prompt is not None:
        g.check_text(state, len(req.prompt))
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await g.off_loop(lambda: tok.encode(req.prompt, add_special_tokens=special), len(req.prompt))
    else:
        ids = await render(state, req, instead="tokenize a prompt instead")
        if req.add_special_tokens:  # the template writes its own special tokens; vLLM's flag adds a BOS
            ids = tok.build_inputs_with_special_tokens(ids)
    strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids,
                         "token_strs": strs})


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    state.adapter_for(req.model)
    ids = g.vocab_ids(state, req.tokens, "tokens")
    text = await g.off_loop(lambda: state.engine.tokenizer.decode(ids), len(ids))
    return JSONResponse({"prompt": text})
