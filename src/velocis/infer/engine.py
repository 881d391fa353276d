"""The inference engine: requests arrive at any time and share one running batch.

    engine = Engine(model, tokenizer, max_num_seqs=16)
    rid = engine.add_request("从前", SamplingParams(temperature=0, max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():        # one scheduler iteration
            print(out.request_id, out.delta, out.finished)
    results = engine.generate(["prompt one", "prompt two"], params)   # offline: all of them to the end

Memory is a paged KV cache (infer/paged.py): fixed-size blocks, a block table per sequence, a
budget in bytes or as a fraction of free memory. Each step the scheduler
  1. decodes every running sequence whose prompt is in the cache: one batched forward, one new
     token each, each row at its own position (continuous batching: sequences join and leave
     between steps);
  2. spends a token budget on prompt chunks (chunked prefill): waiting requests are admitted in
     arrival order while there are sequence slots, and a long prompt is computed over several steps;
  3. when a block cannot be had, preempts the newest running sequence: its blocks are freed and it
     goes back to the front of the queue, to be recomputed later (nothing is lost).
Identical prompt prefixes share refcounted blocks (prefix caching, LRU eviction). Sampling is per
request (infer/sampling.py): parameters, seeds and stop conditions belong to the request, never to
its batch company, so greedy outputs equal each request run alone.
Where every layer is attention (no drafting), steps 1 and 2 are one packed forward: the decode
tokens and prompt chunks back to back in a single row (vLLM's layout; infer/paged.py). Attention
then reads a per-sequence contiguous working copy of the K/V that the blocks hold, grown as
sequences lengthen; it is outside the block budget (at most max_num_seqs x longest sequence).

Speculative decoding (draft_model=...): a small model with the same vocabulary drafts k tokens
per running sequence, the target verifies them in one forward of k+1 positions, and the
acceptance rule of infer/speculative.py keeps the target's distribution exactly (greedy: the same
tokens as without a draft). The draft's KV lives in pools of its own indexed by the same block
tables; a rejected draft's slots are simply past the sequence's length (rollback is free).
draft_model="mtp" drafts with the target's own multi-token-prediction module (DeepSeek-V3's
self-speculation, one token per step): it reads the target's hidden state of each position, kept
from the target's forwards, and keeps its own KV in one more pool. Requests with penalties or
logprobs decode without drafts. Prefix caching is off while drafting.

Recurrent layers (Mamba-2, Gated DeltaNet: cache kind "state") run too, alone or mixed with
attention: each running sequence owns a state slot beside its blocks (infer/paged.py: StateSlots),
zeroed when it is admitted, carried across its prompt chunks and decode steps, freed with it (a
preempted sequence recomputes from zero). Such models take the padded forwards (the decodes
together, each prompt chunk alone: no padding ever enters a state). A state holds every token
before it and cannot be rolled back or shared, so prefix caching is off for them (asking for it
is an error) and speculative decoding is refused.
"""
from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from velocis.errors import VelocisError
from velocis.infer.generate import StreamDecoder
from velocis.infer.paged import BlockAllocator, BlockTables, PagedCache, PagedLayer, block_hashes, blocks_for_budget
from velocis.infer.sampling import PenaltyState, SamplingParams, apply_warpers, check_stop, make_generator, \
    safe_stream_len, sample_batch, stack_penalty_states
from velocis.infer.speculative import accept


@dataclass
class Output:
    """What one step produced for one sequence (sample `index` of request `request_id`)."""

    request_id: str
    index: int
    token_ids: list[int]  # new tokens this step
    delta: str  # new text, safe to print (held back while it may be the start of a stop string)
    text: str  # all text so far
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per new token: (logprob, top-N)
    prompt_tokens: int = 0


@dataclass
class _Seq:
    request_id: str
    index: int
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    stop_ids: set[int]
    generator: torch.Generator | None
    decoder: StreamDecoder | None
    penalties: PenaltyState | None
    arrival: float
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    draft_computed: int = 0  # tokens whose KV is in the draft model's (or the MTP module's) pools
    hidden: list = field(default_factory=list)  # drafting from the model itself: target hidden states from draft_computed on
    matcher: object = None  # structured output: the grammar state (infer/structured.py), masks every step
    registered: int = 0  # full blocks entered into the prefix cache
    slot: int | None = None  # while running: its row of the packed steps' working copy (infer/paged.py)
    text: str = ""
    streamed: int = 0  # characters of text already returned as deltas
    finish_reason: str | None = None

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefill_target(self) -> int:
        """Tokens to compute before decoding: the whole prompt, or, after a preemption, everything but
        the last sampled token (the next decode step feeds it)."""
        return len(self.tokens) - 1 if self.num_output else len(self.tokens)

    @property
    def decoding(self) -> bool:
        return self.num_output > 0 and self.num_computed == len(self.tokens) - 1


def _budget_bytes(kv_cache_memory, device: torch.device) -> int:
    if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, (int, float)) or kv_cache_memory <= 0:
        raise VelocisError(f"kv_cache_memory (--kv-cache-memory) must be bytes (an integer) or a fraction of free "
                           f"memory in (0, 1], got {kv_cache_memory!r}")
    if isinstance(kv_cache_memory, float):
        if kv_cache_memory > 1:
            raise VelocisError(f"kv_cache_memory {kv_cache_memory} is a fraction of free memory: give it in (0, 1]")
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        return int(free * kv_cache_memory)
    return int(kv_cache_memory)


class Engine:
    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 16, block_size: int = 16,
                 kv_cache_memory: int | float = 0.25, max_prefill_tokens: int = 512,
                 prefix_caching: bool | None = None, draft_model=None, num_speculative_tokens: int = 4):
        """prefix_caching: None = on wherever the model allows it (not with recurrent state layers)."""
        for name, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size),
                        ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise VelocisError(f"{name} must be a positive integer, got {v!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_num_seqs, self.block_size = max_num_seqs, block_size
        recurrent = sorted({b.mixer_name for b in model.layers if b.mixer.cache_kind == "state"})
        if recurrent and prefix_caching:
            raise VelocisError(f"prefix_caching: this model has recurrent state layers ({', '.join(recurrent)}) whose "
                               f"state after a prefix is not kept, so prefixes cannot be shared; leave it unset or False")
        if recurrent and draft_model is not None:
            raise VelocisError(f"draft_model: speculative decoding rolls back rejected tokens, and this model's recurrent "
                               f"state layers ({', '.join(recurrent)}) keep no checkpoints to roll back to; decode "
                               f"without a draft")
        if draft_model is not None and not isinstance(draft_model, str) and any(
                b.mixer.cache_kind == "state" for b in draft_model.layers):
            raise VelocisError("draft_model has recurrent state layers, which cannot roll back rejected drafts; "
                               "draft with an attention model")
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = not recurrent if prefix_caching is None else bool(prefix_caching)
        self.context = model.config.max_seq_len
        dtype_bytes = model.dtype.itemsize
        # never more blocks than every slot filled to the full context can use (+ the scratch block)
        most = max_num_seqs * math.ceil(self.context / block_size) + 1
        budget = _budget_bytes(kv_cache_memory, model.device)
        if draft_model is not None and not isinstance(draft_model, str):  # the draft's pools take their share
            budget = budget * model.cache_bytes(dtype_bytes)[0] // (
                model.cache_bytes(dtype_bytes)[0] + draft_model.cache_bytes(draft_model.dtype.itemsize)[0])
        num_blocks = min(most, blocks_for_budget(model, budget, block_size, dtype_bytes, max_num_seqs))
        self.allocator = BlockAllocator(num_blocks)
        self.cache = PagedCache(model, num_blocks, block_size, num_slots=max_num_seqs)
        self.draft, self.draft_cache, self.mtp, self.k = None, None, None, num_speculative_tokens
        if isinstance(draft_model, str):
            pool = model.draft_cache(num_blocks, block_size) if draft_model == "mtp" else None
            if pool is None:
                raise VelocisError(f"draft_model {draft_model!r}: give a model, or 'mtp' for a model with "
                                   f"multi-token-prediction modules (mtp_depth > 0)")
            self.mtp = PagedLayer(pool, BlockTables(block_size, model.device))
            self.k, self.prefix_caching = 1, False  # depth 1: one draft per step, from the last hidden state
        elif draft_model is not None:
            if draft_model.config.vocab_size != model.config.vocab_size:
                raise VelocisError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) is not the "
                                   f"target's ({model.config.vocab_size}); a draft must share the tokenizer")
            if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int) \
                    or num_speculative_tokens < 1:
                raise VelocisError(f"num_speculative_tokens must be a positive integer, got {num_speculative_tokens!r}")
            self.draft = draft_model.eval()
            self.draft_cache = PagedCache(draft_model, num_blocks, block_size)
            self.prefix_caching = False
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self.free_slots = list(range(max_num_seqs))  # a heap: running sequences take the lowest
        # one packed forward per step (infer/paged.py) when every layer's attention takes it; drafting
        # keeps the padded forwards (its verification reads the blocks)
        self.packed = self.draft is None and self.mtp is None and all(
            getattr(b.mixer, "packed_attention", False) for b in model.layers)
        self.eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        if self.eos is None:
            self.eos = model.config.eos_token_id
        self._ids = itertools.count()
        self.counters = {"requests": 0, "finished": 0, "preempted": 0, "prompt_tokens": 0, "generated_tokens": 0,
                         "aborted": 0, "draft_tokens": 0, "accepted_tokens": 0}

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, response_format: dict | None = None) -> str:
        """Queue a request (text or token ids); returns its id. n > 1 queues n sequences.
        response_format (OpenAI's: json_object, json_schema, or Velocis' regex / grammar) constrains
        every sampled token to it (infer/structured.py); an invalid one raises VelocisError."""
        params = params or SamplingParams()
        ids = self._encode(prompt)
        grammar = None
        if response_format is not None:
            from velocis.infer.structured import compile_response_format

            if self.tokenizer is None:
                raise VelocisError("response_format needs the model's tokenizer; give the engine one")
            grammar = compile_response_format(response_format, self.tokenizer,
                                              stop_ids=sorted(params.stop_ids(self.eos)) or None)
        limit = self.context - 1
        if len(ids) > limit:
            raise VelocisError(f"the prompt is {len(ids)} tokens but the model's context is {self.context}: "
                               f"shorten it to at most {limit} tokens")
        need = math.ceil((len(ids) + 1) / self.block_size)
        if need > self.allocator.num_blocks - 1:
            raise VelocisError(f"the prompt needs {need} KV-cache blocks but the cache has "
                               f"{self.allocator.num_blocks - 1}; give the engine more memory (kv_cache_memory)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        for i in range(params.n):
            self.waiting.append(_Seq(
                rid, i, list(ids), len(ids), params, params.stop_ids(self.eos),
                make_generator(params, self.model.device, i),
                StreamDecoder(self.tokenizer) if self.tokenizer is not None else None,
                PenaltyState(ids, self.model.config.vocab_size, self.model.device) if params.uses_penalties else None,
                time.perf_counter(), matcher=grammar.matcher() if grammar is not None else None))
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(ids)
        return rid

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise VelocisError("this engine has no tokenizer: give prompts as token ids")
            ids = self.tokenizer.encode(prompt)
            start = self.model.config.prompt_start_token_id
            if start is not None and ids[:1] != [start]:
                ids = [start] + ids
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise VelocisError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise VelocisError("the prompt is empty; give at least one token")
        if max(ids) >= self.model.config.vocab_size or min(ids) < 0:
            raise VelocisError(f"the prompt has token id {max(ids)} but the model's vocabulary has "
                               f"{self.model.config.vocab_size} ids")
        return ids

    def abort(self, request_id: str) -> list[Output]:
        """Stop a request now (a client went away): its blocks are freed at once."""
        outs = []
        for seq in [s for s in list(self.waiting) + self.running if s.request_id == request_id]:
            seq.finish_reason = "abort"
            outs.append(self._finish(seq, []))
        self.counters["aborted"] += bool(outs)
        return outs

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ memory
    def _blocks_for(self, seq: _Seq, upto: int) -> bool:
        """Make sure seq has blocks for positions < upto (allocating, evicting cached blocks)."""
        while len(seq.blocks) * self.block_size < upto:
            block = self.allocator.allocate()
            if block is None:
                return False
            seq.blocks.append(block)
        return True

    def _free(self, seq: _Seq) -> None:
        for b in seq.blocks:
            self.allocator.release(b)
        if seq.slot is not None:
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None
        seq.blocks, seq.num_computed, seq.registered, seq.draft_computed, seq.hidden = [], 0, 0, 0, []

    def _preempt(self) -> _Seq:
        """Free the newest running sequence's blocks; it is recomputed later, from the queue's front."""
        victim = max(self.running, key=lambda s: s.arrival)
        self.running.remove(victim)
        self._free(victim)
        self.waiting.appendleft(victim)
        self.counters["preempted"] += 1
        return victim

    def _reuse_prefix(self, seq: _Seq) -> None:
        """Start a new sequence on the cached blocks of its prompt's longest cached prefix (never the
        whole prompt: the last prompt token is computed, for its logits)."""
        if not self.prefix_caching:
            return
        usable = (seq.prefill_target - 1) // self.block_size
        for h in block_hashes(seq.tokens[:usable * self.block_size], self.block_size):
            block = self.allocator.lookup(h)
            if block is None:
                break
            seq.blocks.append(block)
        seq.num_computed, seq.registered = len(seq.blocks) * self.block_size, len(seq.blocks)

    def _register_full_blocks(self, seq: _Seq) -> None:
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full > seq.registered:
            hashes = block_hashes(seq.tokens[:full * self.block_size], self.block_size)
            for j in range(seq.registered, full):
                self.allocator.register(seq.blocks[j], hashes[j])
            seq.registered = full

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[Output]:
        """One scheduler iteration: every running sequence's next token and prompt chunks (up to
        max_prefill_tokens), in one packed forward where the model allows it."""
        outputs: list[Output] = []
        decode = [s for s in self.running if s.decoding]
        for seq in sorted(decode, key=lambda s: s.arrival):  # oldest first: preemption takes the newest
            while seq in self.running and not self._blocks_for(seq, seq.num_computed + 1):
                if self._preempt() is seq:
                    break
        decode = [s for s in decode if s in self.running]
        drafted = [s for s in decode if self._drafts(s)]
        if drafted:
            outputs += self._speculate(drafted)
        plain = sorted((s for s in decode if s not in drafted), key=lambda s: s.slot)  # slot order: see PackedStep
        batch = [(s, s.tokens[-1:]) for s in plain]
        batch += self._plan_prefill(batch)
        if not batch:
            return outputs
        seqs, chunks = [s for s, _ in batch], [c for _, c in batch]
        if self.packed:
            return outputs + self._forward_packed(seqs, chunks)
        # padded forwards: the decodes together, then each prompt chunk alone (no padding waste)
        decodes = [i for i, s in enumerate(seqs) if s.decoding]
        if decodes:
            outputs += self._forward([seqs[i] for i in decodes], [chunks[i] for i in decodes])
        for i in sorted(set(range(len(seqs))) - set(decodes)):
            outputs += self._forward([seqs[i]], [chunks[i]])
        return outputs

    def _plan_prefill(self, batch: list[tuple[_Seq, list[int]]]) -> list[tuple[_Seq, list[int]]]:
        """Prompt chunks for this step, up to max_prefill_tokens: running sequences' unfinished prompts
        first, then waiting requests while there are slots. When blocks run out the newest running
        sequence is preempted (and dropped from `batch` if it was in it)."""
        chunks: list[tuple[_Seq, list[int]]] = []
        pending: set[int] = set()  # prefix hashes of full blocks this step computes
        budget = self.max_prefill_tokens
        while budget > 0:
            seq = self._next_prefill({id(s) for s, _ in chunks}, pending)
            if seq is None:
                break
            n = min(budget, seq.prefill_target - seq.num_computed)
            if not self._blocks_for(seq, seq.num_computed + n):
                if len(self.running) == 1:
                    break
                victim = self._preempt()
                batch[:] = [b for b in batch if b[0] is not victim]
                chunks = [b for b in chunks if b[0] is not victim]
                if victim is seq:
                    break
                continue
            budget -= n
            chunks.append((seq, seq.tokens[seq.num_computed:seq.num_computed + n]))
            if self.prefix_caching and self.waiting:
                full = (seq.num_computed + n) // self.block_size * self.block_size
                pending.update(block_hashes(seq.tokens[:full], self.block_size))
        return chunks

    def _drafts(self, seq: _Seq) -> bool:
        """Does this sequence decode with drafts this step (blocks for the k+1 verified positions)?"""
        if (self.draft is None and self.mtp is None) or seq.penalties is not None or seq.params.logprobs is not None \
                or seq.matcher is not None:
            return False
        room = self.context - len(seq.tokens)
        return room > self.k and self._blocks_for(seq, seq.num_computed + self.k + 1)

    def _draw(self, q: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
        """One draft token per row from the draft distributions q [B, V] (greedy rows: the argmax)."""
        return torch.stack([q[b].argmax() if s.params.greedy else torch.multinomial(q[b], 1, generator=s.generator)[0]
                            for b, s in enumerate(seqs)])

    def _propose_with_model(self, seqs: list[_Seq]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """k draft tokens per row from the draft model, and the distributions they were drawn from."""
        dev, params = self.model.device, [s.params for s in seqs]
        # the draft catches up on the tokens it has not seen (right-padded; padding lands past the rows)
        chunks = [s.tokens[s.draft_computed:] for s in seqs]
        width = max(map(len, chunks))
        ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in chunks], device=dev)
        positions = torch.tensor([s.draft_computed for s in seqs], device=dev)[:, None] + torch.arange(width, device=dev)
        self.draft_cache.bind([s.blocks for s in seqs], int(positions.max()) + 1)
        last = torch.tensor([len(c) - 1 for c in chunks], device=dev)
        logits = self.draft(ids, cache=self.draft_cache, positions=positions, logits_at=last)[:, -1]
        drafts, qs = [], []
        for j in range(self.k):
            q = apply_warpers(logits, params).softmax(-1)
            drafts.append(self._draw(q, seqs))
            qs.append(q)
            if j < self.k - 1:
                pos = torch.tensor([len(s.tokens) + j for s in seqs], device=dev)[:, None]
                self.draft_cache.bind([s.blocks for s in seqs], int(pos.max()) + 1)
                logits = self.draft(drafts[-1][:, None], cache=self.draft_cache, positions=pos)[:, -1]
        return drafts, qs

    def _propose_with_mtp(self, seqs: list[_Seq]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One draft per row from the MTP module: position i pairs the target's hidden state h_i with
        token i+1; the pairs it has not seen catch up first, the last one (h of the last computed
        position, the last token) predicts the next token."""
        dev = self.model.device
        chunks = [s.tokens[s.draft_computed + 1:] for s in seqs]  # token i+1 for each pending h_i
        width = max(map(len, chunks))
        ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in chunks], device=dev)
        h = torch.stack([torch.cat(s.hidden + [s.hidden[-1][-1:]] * (width - len(c))) for s, c in zip(seqs, chunks)])
        positions = torch.tensor([s.draft_computed for s in seqs], device=dev)[:, None] + torch.arange(width, device=dev)
        self.mtp.tables.set([s.blocks for s in seqs], -(-(int(positions.max()) + 1) // self.block_size))
        logits = self.model.draft_logits(h, ids, positions, self.mtp)
        logits = logits[torch.arange(len(seqs), device=dev), torch.tensor([len(c) - 1 for c in chunks], device=dev)]
        for s in seqs:
            s.draft_computed, s.hidden = len(s.tokens) - 1, []
        q = apply_warpers(logits, [s.params for s in seqs]).softmax(-1)
        return [self._draw(q, seqs)], [q]

    def _speculate(self, seqs: list[_Seq]) -> list[Output]:
        """k draft tokens per sequence, one target forward to verify them, the acceptance rule."""
        dev, k = self.model.device, self.k
        drafts, qs = self._propose_with_mtp(seqs) if self.mtp is not None else self._propose_with_model(seqs)
        drafts_t = torch.stack(drafts, 1)  # [B, k]
        # the target scores the last token and the k drafts in one forward
        ids = torch.cat([torch.tensor([s.tokens[-1] for s in seqs], device=dev)[:, None], drafts_t], 1)
        positions = torch.tensor([s.num_computed for s in seqs], device=dev)[:, None] + torch.arange(k + 1, device=dev)
        self.cache.bind([s.blocks for s in seqs], int(positions.max()) + 1)
        out = self.model(ids, cache=self.cache, positions=positions, return_hidden=True)
        target, hidden = out.logits, (out.hidden if self.mtp is not None else None)
        outputs = []
        for b, seq in enumerate(seqs):
            p = apply_warpers(target[b], [seq.params] * (k + 1)).softmax(-1)
            q = torch.stack([qs[j][b] for j in range(k)])
            tokens = accept(p, q, drafts_t[b].tolist(), seq.params.greedy, seq.generator)
            L = len(seq.tokens)
            self.counters["draft_tokens"] += k
            self.counters["accepted_tokens"] += len(tokens) - 1
            seq.num_computed = L + len(tokens) - 1  # the last token and the accepted drafts are cached
            if hidden is not None:  # h of the positions now cached, for the next MTP drafts
                seq.hidden = [hidden[b, :len(tokens)]]
            else:
                seq.draft_computed = min(L + k - 1, L + len(tokens) - 1)
            out = None
            for t in tokens:
                o = self._append(seq, t, None)
                out = o if out is None else Output(o.request_id, o.index, out.token_ids + o.token_ids,
                                                   out.delta + o.delta, o.text, o.finished, o.finish_reason,
                                                   None, o.prompt_tokens)
                if o.finished:
                    break
            outputs.append(out)
        return outputs

    def _next_prefill(self, planned: set[int], pending: set[int]) -> _Seq | None:
        """A running sequence with prompt left to compute (and no chunk planned yet this step), else
        the next waiting one if a slot is free. A waiting prompt whose first block this step computes
        for another sequence waits a step, to find it in the prefix cache."""
        for seq in self.running:
            if seq.num_computed < seq.prefill_target and id(seq) not in planned:
                return seq
        if self.waiting and len(self.running) < self.max_num_seqs:
            first = block_hashes(self.waiting[0].tokens[:self.block_size], self.block_size)
            if first and first[0] in pending and not self.allocator.has(first[0]):
                return None
            seq = self.waiting.popleft()
            self.running.append(seq)
            seq.slot = heapq.heappop(self.free_slots)
            self.cache.reset_slot(seq.slot)  # a recurrent state starts from zeros
            self._reuse_prefix(seq)
            if self.packed and seq.num_computed:
                self.cache.load(seq.slot, seq.blocks, seq.num_computed, self.max_num_seqs)
            return seq
        return None

    def _forward_packed(self, seqs: list[_Seq], chunks: list[list[int]]) -> list[Output]:
        """One forward of every chunk back to back in a single row (infer/paged.py's packed step)."""
        dev = self.model.device
        ids = torch.tensor([[t for c in chunks for t in c]], device=dev)
        positions = self.cache.bind_packed([s.num_computed for s in seqs], [len(c) for c in chunks],
                                           [s.blocks for s in seqs], [s.slot for s in seqs], self.max_num_seqs)
        ends = list(itertools.accumulate(len(c) for c in chunks))
        ready = [i for i, (s, c) in enumerate(zip(seqs, chunks)) if s.num_computed + len(c) == len(s.tokens)]
        at = torch.tensor([[ends[i] - 1 for i in ready] or [0]], device=dev)  # logits only where we sample
        out = self.model(ids, cache=self.cache, positions=positions, logits_at=at, return_hidden=True)
        for b, (s, c) in enumerate(zip(seqs, chunks)):
            s.num_computed += len(c)
            self._register_full_blocks(s)
            if self.mtp is not None:  # the MTP drafter reads the target's hidden state of every position
                s.hidden.append(out.hidden[0, ends[b] - len(c):ends[b]])
        if not ready:
            return []
        return self._sample([seqs[i] for i in ready], out.logits[0])

    def _forward(self, seqs: list[_Seq], chunks: list[list[int]]) -> list[Output]:
        T = max(len(c) for c in chunks)
        pad = chunks[0][0]
        ids = torch.tensor([c + [pad] * (T - len(c)) for c in chunks], device=self.model.device)
        start = torch.tensor([s.num_computed for s in seqs], device=self.model.device)
        positions = start[:, None] + torch.arange(T, device=self.model.device)
        self.cache.bind([s.blocks for s in seqs], int(positions.max()) + 1, [s.slot for s in seqs])
        last = torch.tensor([len(c) - 1 for c in chunks], device=self.model.device)
        out = self.model(ids, cache=self.cache, positions=positions, logits_at=last, return_hidden=True)
        logits = out.logits[:, -1]
        for b, (s, c) in enumerate(zip(seqs, chunks)):
            s.num_computed += len(c)
            self._register_full_blocks(s)
            if self.mtp is not None:  # the MTP drafter reads the target's hidden state of every position
                s.hidden.append(out.hidden[b, :len(c)])
        # sample where the chunk ended at the sequence's last token (a recomputed, preempted sequence
        # stops one short: its last token was sampled already, and the next decode step feeds it)
        ready = [i for i, s in enumerate(seqs) if s.num_computed == len(s.tokens)]
        if not ready:
            return []
        return self._sample([seqs[i] for i in ready], logits[ready])

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[Output]:
        history = None
        if any(s.penalties is not None for s in seqs):
            history = stack_penalty_states([s.penalties for s in seqs], logits.shape[-1], logits.device)
        if any(s.matcher is not None for s in seqs):
            logits = logits.clone()
            for b, seq in enumerate(seqs):
                if seq.matcher is not None:  # only what the grammar allows next (-inf elsewhere)
                    seq.matcher.apply_mask(logits[b:b + 1])
        result = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs], history=history)
        outputs = []
        for i, (seq, tok) in enumerate(zip(seqs, result.token_ids.tolist())):
            lp = None
            if result.logprobs is not None and seq.params.logprobs is not None:
                lp = [(float(result.logprobs[i]), result.top_logprobs[i])]
            outputs.append(self._append(seq, tok, lp))
        return outputs

    def _append(self, seq: _Seq, token: int, logprobs) -> Output:
        """Add a sampled token; finish the sequence on a stop token, a stop string, its length, or a
        structured output that is complete."""
        self.counters["generated_tokens"] += 1
        if seq.matcher is not None:
            seq.matcher.advance(token)
        if token in seq.stop_ids:  # the stop token ends the text; it is not part of it
            seq.finish_reason = "stop"
            return self._finish(seq, [], logprobs)
        seq.tokens.append(token)
        if seq.penalties is not None:
            seq.penalties.append(token)
        if seq.decoder is not None:
            stopped, seq.text = check_stop(seq.text, seq.decoder.push(token), seq.params.stop)
            if stopped:
                seq.finish_reason = "stop"
                return self._finish(seq, [token], logprobs)
        if seq.matcher is not None and seq.matcher.is_finished():  # nothing but EOS can follow
            seq.finish_reason = "stop"
            return self._finish(seq, [token], logprobs)
        if (seq.params.max_tokens is not None and seq.num_output >= seq.params.max_tokens) \
                or len(seq.tokens) >= self.context:
            seq.finish_reason = "length"
            return self._finish(seq, [token], logprobs)
        ready = safe_stream_len(seq.text, seq.params.stop)
        delta, seq.streamed = seq.text[seq.streamed:ready], max(seq.streamed, ready)
        return Output(seq.request_id, seq.index, [token], delta, seq.text, logprobs=logprobs,
                      prompt_tokens=seq.prompt_len)

    def _finish(self, seq: _Seq, tokens: list[int], logprobs=None) -> Output:
        if seq.decoder is not None and seq.finish_reason != "stop":
            seq.text += seq.decoder.flush()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        self.counters["finished"] += 1
        delta = seq.text[seq.streamed:]
        seq.streamed = len(seq.text)
        return Output(seq.request_id, seq.index, tokens, delta, seq.text, True, seq.finish_reason, logprobs,
                      seq.prompt_len)

    def warmup(self) -> None:
        """Run one short request to the end, so the first real one does not pay for one-time set-up
        (building the CPU kernels, first allocations, the working copy). Leaves no trace: nothing
        enters the prefix cache and the counters are as they were."""
        n = min(80, self.context - 3, (self.allocator.num_blocks - 1) * self.block_size - 3)
        if self.has_unfinished() or n < 1:
            return
        counters, caching = dict(self.counters), self.prefix_caching
        self.prefix_caching = False
        try:  # enough prompt for the large-product kernels, and a decode step
            self.generate([[0] * n], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        finally:
            self.counters, self.prefix_caching = counters, caching

    # ------------------------------------------------------------------ offline use and metrics
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[dict]:
        """Run every prompt to the end; returns, per prompt in order, {"text", "token_ids",
        "finish_reason"} (lists of those for n > 1)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        results: dict[str, dict[int, dict]] = {rid: {} for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                r = results[out.request_id].setdefault(out.index, {"text": "", "token_ids": [], "finish_reason": None})
                r["token_ids"] += out.token_ids
                r["text"] = out.text
                r["finish_reason"] = out.finish_reason
        out = []
        for rid in ids:
            samples = [results[rid][i] for i in sorted(results[rid])]
            out.append(samples[0] if len(samples) == 1 else samples)
        return out

    def stats(self) -> dict:
        used = self.allocator.num_blocks - 1 - self.allocator.num_free
        q = self.allocator.queries
        drafted = self.counters["draft_tokens"]
        return {"draft_acceptance_rate": self.counters["accepted_tokens"] / drafted if drafted else 0.0,"running": len(self.running), "waiting": len(self.waiting), "kv_blocks_used": used,
                "kv_blocks_free": self.allocator.num_free, "kv_blocks_total": self.allocator.num_blocks - 1,
                "prefix_cache_hit_rate": self.allocator.hits / q if q else 0.0, **self.counters}
