"""common.cli (the generate command of both twins) and common.textgen, with fake runners on a
checkpoint directory that has a tokenizer."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

import common
from common import cli
from common.checkpoint import write_checkpoint
from common.config import Qwen3Config, shrink
from common.sampling import GenerationArgsError
from common.textgen import (StreamDecoder, TextError, chat_template, eos_token_ids, load_tokenizer, read_json,
                            render_chat)
from common.weights import WeightsError

CFG = dataclasses.replace(shrink(Qwen3Config.preset("Qwen3-0.6B"), layers=1, width=16, vocab=1024),
                          dtype="float32", max_position_embeddings=256)
REPLY = " fox jumps é€ over"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", CFG, seed=0, tokenizer=True)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture
def copy_dir(model_dir, tmp_path):
    return lambda: shutil.copytree(model_dir, tmp_path / "copy")


class FakeRunner:
    """Returns REPLY's tokens then eos; records what it was asked."""

    def __init__(self, model_dir, reply_ids, calls, *, stats=None, fail=None):
        self.config = Qwen3Config.from_pretrained(model_dir)
        self.reply, self.calls, self.fail = reply_ids, calls, fail
        if stats is not None:
            self.last_stats = stats

    def generate(self, prompts, max_new_tokens, **kw):
        self.calls.append(("generate", [list(p) for p in prompts], max_new_tokens, kw))
        if self.fail:
            raise self.fail
        return [list(self.reply[:max_new_tokens]) for _ in prompts]


class FakeStreamRunner(FakeRunner):
    def generate_stream(self, prompt_ids, max_new_tokens, **kw):
        self.calls.append(("stream", list(prompt_ids), max_new_tokens, kw))
        for i, t in enumerate(self.reply[:max_new_tokens]):
            if self.fail and i == 3:
                raise self.fail
            yield [t]  # one token per chunk: multi-byte characters arrive split


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


@pytest.fixture
def invoke(model_dir, tok):
    """invoke(*args, runner=FakeRunner, model=model_dir, **runner_kwargs) -> (rc, out, err, calls, loads)."""
    eos = tok.token_to_id("<|im_end|>")
    reply_ids = tok.encode(REPLY).ids + [eos]

    def run(*args, runner=FakeRunner, model=model_dir, load_error=None, **kw):
        calls, loads = [], []

        def load(d, *, dtype, fused):
            loads.append((d, dtype, fused))
            if load_error:
                raise load_error
            return runner(d, reply_ids, calls, **kw)

        out, err = Recorder(), io.StringIO()
        argv = (["--model", str(model)] if model is not None else []) + list(args)
        rc = cli.run(load, argv, prog="gen", out=out, err=err)
        return rc, out, err.getvalue(), calls, loads

    return run


# ----- normal operation ----------------------------------------------------------------------------

def test_single_prompt_streams_text_incrementally(invoke, tok):
    rc, out, err, calls, _ = invoke("--prompt", "The quick brown", runner=FakeStreamRunner)
    assert rc == 0, err
    assert out.getvalue() == REPLY + "\n"
    pieces = [w for w in out.writes if w]
    assert len(pieces) > 5  # printed as produced, not at the end
    assert all("\ufffd" not in w for w in out.writes)  # never half a character
    assert any("é" in w for w in pieces) and any("€" in w for w in pieces)
    kind, ids, max_new, kw = calls[0]
    assert kind == "stream" and ids == tok.encode("The quick brown").ids and max_new == 128
    assert "time to first token" in err and "tok/s" in err


def test_without_generate_stream_prints_the_completion(invoke, tok):
    rc, out, err, calls, _ = invoke("--prompt", "The quick brown", "--max-new-tokens", "7")
    assert rc == 0
    assert calls[0][0] == "generate" and calls[0][2] == 7
    assert out.getvalue() == tok.decode(tok.encode(REPLY).ids[:7]) + "\n"
    assert "generate 7 tokens" in err and "(prefill included)" in err


def test_batch_prints_each_completion(invoke, tok):
    rc, out, err, calls, _ = invoke("--prompt", "one", "--prompt", "two words", runner=FakeStreamRunner)
    assert rc == 0
    assert len(calls) == 1 and calls[0][0] == "generate"  # batched, not streamed
    assert calls[0][1] == [tok.encode("one").ids, tok.encode("two words").ids]
    assert out.getvalue() == f'=== [1/2] prompt: "one"\n{REPLY}\n=== [2/2] prompt: "two words"\n{REPLY}\n'
    assert f"prompt tokens: {len(tok.encode('one').ids) + len(tok.encode('two words').ids)} (2 prompts)" in err


def test_prompt_file_one_prompt_per_line(invoke, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\nsecond prompt\n", encoding="utf-8")
    rc, out, _, calls, _ = invoke("--prompt-file", str(f), "--prompt", "third")
    assert rc == 0
    assert len(calls[0][1]) == 3
    assert '=== [1/3] prompt: "third"' in out.getvalue() and '=== [3/3] prompt: "second prompt"' in out.getvalue()


def test_runner_stats_are_reported(invoke, tok):
    stats = {"prefill_s": 0.25, "decode_s": 0.5, "new_tokens": 10}
    rc, _, err, _, _ = invoke("--prompt", "hello", stats=stats)
    assert rc == 0
    assert err.strip() == f"prompt tokens: {len(tok.encode('hello').ids)} | prefill 0.250 s | decode 10 tokens " \
                          f"in 0.500 s = 20.0 tok/s"


@pytest.mark.parametrize("flag, expected", [("auto", "auto"), ("on", True), ("off", False)])
def test_fused_and_dtype_reach_the_loader(invoke, model_dir, flag, expected):
    rc, _, _, _, loads = invoke("--prompt", "x", "--fused", flag, "--dtype", "float32")
    assert rc == 0 and loads == [(str(model_dir), "float32", expected)]


def test_sampling_flags_and_eos_reach_the_runner(invoke, tok):
    rc, _, _, calls, _ = invoke("--prompt", "x", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9",
                                "--seed", "3")
    assert rc == 0
    assert calls[0][3] == dict(temperature=0.7, top_k=5, top_p=0.9, seed=3,
                               eos_token_id=[tok.token_to_id("<|im_end|>")])


def test_defaults_come_from_generation_config(invoke, copy_dir):
    d = copy_dir()
    (d / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": [7, 2]}))
    rc, _, _, calls, _ = invoke("--prompt", "x", model=d)
    assert rc == 0
    assert calls[0][3] == dict(temperature=0.6, top_k=20, top_p=0.95, seed=0, eos_token_id=[7, 2])
    rc, _, _, calls, _ = invoke("--prompt", "x", "--temperature", "0", "--top-p", "1", model=d)
    assert calls[0][3]["temperature"] == 0 and calls[0][3]["top_p"] == 1.0
    (d / "generation_config.json").unlink()  # no generation config: greedy, eos from tokenizer_config.json
    rc, _, _, calls, _ = invoke("--prompt", "x", model=d)
    assert calls[0][3] == dict(temperature=0.0, top_k=0, top_p=1.0, seed=0, eos_token_id=[2])


def test_eos_fallbacks(copy_dir, tok):
    d = copy_dir()
    assert eos_token_ids(d, tok) == [2]  # generation_config.json (written by common.checkpoint)
    (d / "generation_config.json").write_text("{}")
    assert eos_token_ids(d, tok) == [tok.token_to_id("<|im_end|>")]  # tokenizer_config.json
    tcfg = read_json(d / "tokenizer_config.json")
    tcfg["eos_token"] = {"content": "<|endoftext|>", "special": True}  # the AddedToken spelling
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    assert eos_token_ids(d, tok) == [tok.token_to_id("<|endoftext|>")]
    del tcfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    assert eos_token_ids(d, tok) == [2]  # config.json
    cfg = read_json(d / "config.json")
    cfg["eos_token_id"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    assert eos_token_ids(d, tok) == []
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(TextError, match="generation_config.json: eos_token_id='two'"):
        eos_token_ids(d, tok)


def test_default_model(invoke, model_dir, monkeypatch):
    monkeypatch.setattr(common, "default_model", lambda: str(model_dir), raising=False)
    rc, _, _, _, loads = invoke("--prompt", "x", model=None)
    assert rc == 0 and loads[0][0] == str(model_dir)
    monkeypatch.delattr(common, "default_model")
    rc, _, err, _, _ = invoke("--prompt", "x", model=None)
    assert rc == 2 and err.startswith("error: --model:")

    def broken():
        raise FileNotFoundError("shipped checkpoint not found")

    monkeypatch.setattr(common, "default_model", broken, raising=False)
    rc, _, err, _, _ = invoke("--prompt", "x", model=None)
    assert rc == 2 and "--model" in err and "shipped checkpoint not found" in err


# ----- chat template ---------------------------------------------------------------------------

def test_chat_renders_the_template_like_transformers(invoke, model_dir):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    rc, _, _, calls, _ = invoke("--chat", "--prompt", "héllo there", "--prompt", "second")
    assert rc == 0
    for prompt, ids in zip(["héllo there", "second"], calls[0][1]):
        want = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                          add_generation_prompt=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ids == list(want)


QWEN_LIKE = textwrap.dedent("""\
    {%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
    {%- set ns = namespace(turns=0) %}
    {%- for message in messages %}
        {%- if message.role not in ['system', 'user', 'assistant'] %}
            {{- raise_exception('unknown role ' + message.role) }}
        {%- endif %}
        {%- if message.role == 'system' %}{% continue %}{% endif %}
        {%- set ns.turns = ns.turns + 1 %}
        {%- if message.content is string %}
    <|im_start|>{{ message.role }}
    {{ message.content | trim }}<|im_end|>
        {% endif %}
    {%- endfor %}
    {%- if add_generation_prompt %}
    <|im_start|>assistant {{ ns.turns }} {{ eos_token }}{{ bos_token }} {{ {'k': 'é<>'} | tojson }}
        {%- if enable_thinking is defined and enable_thinking is false %}
    <think>

    </think>

        {% endif %}
    {%- endif %}
    """)
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  hi  "},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]


@pytest.mark.parametrize("extra", [{}, {"enable_thinking": False}])
def test_render_chat_equals_transformers_on_a_qwen_like_template(copy_dir, extra):
    transformers = pytest.importorskip("transformers")
    d = copy_dir()
    tcfg = read_json(d / "tokenizer_config.json")
    tcfg["chat_template"] = QWEN_LIKE
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    want = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, **extra)
    got = render_chat(chat_template(d), MESSAGES, tcfg, **extra)
    assert got == want
    assert "<think>" in got if extra else "<think>" not in got
    with pytest.raises(TextError, match="chat template: unknown role tool"):
        render_chat(QWEN_LIKE, [{"role": "tool", "content": "x"}], tcfg)


def test_chat_template_file_and_named_templates(copy_dir):
    d = copy_dir()
    tcfg = read_json(d / "tokenizer_config.json")
    tcfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    assert chat_template(d) == "D"
    del tcfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (d / "chat_template.jinja").write_text("J{{ messages[0].content }}")
    assert chat_template(d) == "J{{ messages[0].content }}"
    (d / "chat_template.jinja").unlink()
    with pytest.raises(TextError, match="no chat_template"):
        chat_template(d)


def test_stream_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("aé€b").ids
    dec = StreamDecoder(tok)
    pieces = [dec.push([t]) for t in ids]
    assert "".join(pieces) + dec.finish() == "aé€b"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 3  # é (2 bytes) and € (3 bytes) waited for their last byte
    dec = StreamDecoder(tok)
    assert dec.push(tok.encode("€").ids[:1]) == "" and dec.finish() == "\ufffd"  # cut off: shown as such


# ----- bad input --------------------------------------------------------------------------------

def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()


def _no_template(d):
    tcfg = read_json(d / "tokenizer_config.json")
    del tcfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))


def _bad_config(d):
    (d / "config.json").write_text("{oops")


@pytest.mark.parametrize("args, mutate, needle", [
    (["--prompt", "x"], _no_tokenizer, "tokenizer.json: missing"),
    (["--prompt", "x", "--chat"], _no_template, "no chat_template"),
    (["--prompt", "x"], _bad_config, "config.json: not valid JSON"),
    (["--prompt", "The quick brown fox " * 80], None, "--prompt: prompt 1 has"),
    (["--prompt", "x", "--max-new-tokens", "256"], None, "--max-new-tokens=256 that exceeds max_position_embeddings=256"),
    (["--prompt", "x", "--max-new-tokens", "0"], None, "--max-new-tokens=0: expected an integer >= 1"),
    (["--prompt", "x", "--top-p", "0"], None, "--top-p=0.0: expected a value in (0, 1]"),
    (["--prompt", "x", "--top-p", "1.5"], None, "--top-p=1.5"),
    (["--prompt", "x", "--temperature", "-1"], None, "--temperature=-1.0"),
    (["--prompt", "x", "--top-k", "-2"], None, "--top-k=-2"),
    (["--prompt", ""], None, "--prompt: prompt 1 is empty"),
    ([], None, "--prompt: give at least one"),
    (["--prompt-file", "/nonexistent/prompts.txt"], None, "--prompt-file: /nonexistent/prompts.txt does not exist"),
])
def test_bad_input_is_one_line_naming_the_flag_or_file(invoke, copy_dir, args, mutate, needle):
    model = None
    if mutate:
        model = copy_dir()
        mutate(model)
    rc, out, err, calls, loads = invoke(*args, **({"model": model} if model else {}))
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert "Traceback" not in err and not calls and not loads  # refused before loading the model


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_prompt_file(invoke, tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    rc, _, err, _, _ = invoke("--prompt-file", str(f))
    assert rc == 2 and f"--prompt-file: {f} holds no prompt (empty file)" in err


def test_missing_model_dir(invoke, tmp_path):
    rc, _, err, _, _ = invoke("--prompt", "x", model=tmp_path / "nowhere")
    assert rc == 2 and err.strip() == f"error: --model: directory {tmp_path / 'nowhere'} does not exist"


@pytest.mark.parametrize("args", [["--fused", "maybe"], ["--dtype", "float64"], ["--max-new-tokens", "ten"],
                                  ["--quantization", "int4"], ["--no-such-flag"],
                                  ["--seed", "1180591620717411303424"], ["--seed", str(2 ** 63)], ["--seed", "-1"],
                                  ["--seed", "0.5"]])
def test_argparse_rejects_bad_choices(invoke, capsys, args):
    """One `error:` line naming the flag and --help, not argparse's usage block (common.argparsing)."""
    rc, _, _, calls, _ = invoke("--prompt", "x", *args)
    err = capsys.readouterr().err  # argparse writes the error to sys.stderr
    assert rc == 2 and not calls
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert args[0] in err and "--help" in err and "Traceback" not in err


@pytest.mark.parametrize("error, needle", [
    (GenerationArgsError("prompts[0]: 30 prompt tokens + max_new_tokens=40 exceed the KV cache (64)"), "KV cache"),
    (ValueError("cache of 4 blocks is too small"), "cache of 4 blocks"),
])
def test_runner_limits_are_reported(invoke, error, needle):
    rc, _, err, _, _ = invoke("--prompt", "x", fail=error)
    assert rc == 2 and err.strip() == f"error: {error}" and needle in err


@pytest.mark.parametrize("error, needle", [
    (WeightsError("/m/model.safetensors: tensor 'x' has shape [1], expected [2]"), "has shape"),
    (RuntimeError("fused kernels need a CUDA GPU"), "--fused on"),
])
def test_load_errors_are_reported(invoke, error, needle):
    rc, _, err, _, _ = invoke("--prompt", "x", "--fused", "on", load_error=error)
    assert rc == 2 and str(error) in err and needle in err and len(err.strip().splitlines()) == 1


# ----- Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_during_generate(invoke):
    rc, out, err, _, _ = invoke("--prompt", "x", fail=KeyboardInterrupt())
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


def test_ctrl_c_while_streaming_keeps_the_partial_text(invoke, tok):
    rc, out, err, _, _ = invoke("--prompt", "x", runner=FakeStreamRunner, fail=KeyboardInterrupt())
    assert rc == 130 and "interrupted" in err
    assert out.getvalue() == tok.decode(tok.encode(REPLY).ids[:3]) + "\n"


def test_ctrl_c_during_load(invoke):
    rc, _, err, _, _ = invoke("--prompt", "x", load_error=KeyboardInterrupt())
    assert rc == 130 and "interrupted" in err


# ----- as a real process, and with transformers as the runner -------------------------------------

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from common.cli import main
from common.config import Qwen3Config

class Runner:
    def __init__(self, d):
        self.config = Qwen3Config.from_pretrained(d)
    def generate(self, prompts, max_new_tokens, **kw):
        if {interrupt!r}:
            raise KeyboardInterrupt
        return [[40, 41, 42] for _ in prompts]

main(lambda d, *, dtype, fused: Runner(d), prog="fakegen")
"""


@pytest.mark.parametrize("interrupt, args, rc, needle", [
    (False, ["--prompt", "x"], 0, "prompt tokens"),
    (False, ["--prompt", "x", "--top-p", "2"], 2, "error: --top-p=2.0"),
    (True, ["--prompt", "x"], 130, "interrupted"),
])
def test_as_a_process(model_dir, tmp_path, interrupt, args, rc, needle):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT.format(root=str(cli.Path(cli.__file__).resolve().parents[1]), interrupt=interrupt))
    p = subprocess.run([sys.executable, str(script), "--model", str(model_dir), *args], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == rc, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr


def test_with_transformers_runner(model_dir, tok):
    hf_runner = pytest.importorskip("common.hf_runner")
    pytest.importorskip("transformers")
    rc_out = Recorder()
    err = io.StringIO()
    rc = cli.run(hf_runner.load, ["--model", str(model_dir), "--prompt", "The quick", "--max-new-tokens", "9",
                                  "--dtype", "float32"], out=rc_out, err=err)
    assert rc == 0, err.getvalue()
    ids = tok.encode("The quick").ids
    want = hf_runner.load(model_dir).generate([ids], 9, eos_token_id=[tok.token_to_id("<|im_end|>")])[0]
    assert rc_out.getvalue() == tok.decode(want, skip_special_tokens=True) + "\n"


# ----- what a new user meets first -----------------------------------------------------------------

def test_help_shows_every_default(capsys):
    parser = cli.build_parser("gen")
    text = parser.format_help()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings == ["-h", "--help"] or action.const is True:  # flags: off unless given
            continue
        assert "default" in formatter._get_help_string(action), action.option_strings
    assert "(default: 128)" in text and "(default: bfloat16)" in text and "(default: auto)" in text
    assert "--no-think" in text and "--system" in text
    assert "generation_config.json" in text  # the rule behind the None defaults


def test_model_naming_a_file(invoke, model_dir):
    rc, _, err, _, loads = invoke("--prompt", "x", model=model_dir / "config.json")
    assert rc == 2 and not loads
    assert err.strip() == (f"error: --model: {model_dir / 'config.json'} is a file; expected a checkpoint "
                           f"directory (config.json, *.safetensors, tokenizer.json)")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_temperature_must_be_finite(invoke, value):
    rc, _, err, calls, _ = invoke("--prompt", "x", f"--temperature={value}")
    assert rc == 2 and not calls and err.startswith("error: --temperature=") and "finite" in err


class TTY(Recorder):
    def isatty(self):
        return True


def test_terminal_echoes_the_prompt_dimmed(model_dir, tok, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    eos = tok.token_to_id("<|im_end|>")
    load = lambda d, *, dtype, fused: FakeStreamRunner(d, tok.encode(REPLY).ids + [eos], [])  # noqa: E731
    argv = ["--model", str(model_dir), "--prompt", "The quick"]
    out = TTY()
    assert cli.run(load, argv, out=out, err=io.StringIO()) == 0
    assert out.getvalue() == cli.DIM + "The quick" + cli.PLAIN + REPLY + "\n"
    out = TTY()
    assert cli.run(load, argv + ["--chat"], out=out, err=io.StringIO()) == 0
    assert out.getvalue() == cli.DIM + "The quick" + cli.PLAIN + "\n" + REPLY + "\n"  # a reply starts a line
    monkeypatch.setenv("NO_COLOR", "1")
    out = TTY()
    assert cli.run(load, argv, out=out, err=io.StringIO()) == 0
    assert out.getvalue() == REPLY + "\n"


def test_batch_completions_stay_apart_when_one_starts_with_a_newline(model_dir, tok):
    reply = "\n[2] not a header\n=== still the completion"
    eos = tok.token_to_id("<|im_end|>")
    calls = []
    load = lambda d, *, dtype, fused: FakeRunner(d, tok.encode(reply).ids + [eos], calls)  # noqa: E731
    out = io.StringIO()
    rc = cli.run(load, ["--model", str(model_dir), "--prompt", "a\nb", "--prompt", "c"], out=out,
                 err=io.StringIO())
    assert rc == 0
    lines = out.getvalue().split("\n")
    headers = [i for i, line in enumerate(lines) if line.startswith("=== [")]
    assert [lines[i] for i in headers] == ['=== [1/2] prompt: "a\\nb"', '=== [2/2] prompt: "c"']
    assert "\n".join(lines[headers[0] + 1:headers[1]]) == reply


QWEN3_STYLE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


@pytest.mark.parametrize("flags, system, thinking", [
    (["--chat"], None, True),
    (["--no-think"], None, False),  # implies --chat
    (["--system", "Be brief."], "Be brief.", True),  # implies --chat
    (["--chat", "--system", "Be brief.", "--no-think"], "Be brief.", False),
])
def test_system_and_no_think_render_like_transformers(invoke, copy_dir, tok, flags, system, thinking):
    transformers = pytest.importorskip("transformers")
    d = copy_dir()
    tcfg = read_json(d / "tokenizer_config.json")
    tcfg["chat_template"] = QWEN3_STYLE
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    rc, _, err, calls, _ = invoke(*flags, "--prompt", "hello", model=d)
    assert rc == 0, err
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "hello"}]
    text = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **({} if thinking else {"enable_thinking": False}))
    assert calls[0][1] == [tok.encode(text, add_special_tokens=False).ids]
    assert text.endswith("<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n"))


def test_no_think_on_a_template_without_the_switch_says_so(invoke):
    rc, _, err, calls, _ = invoke("--no-think", "--prompt", "hello")
    assert rc == 0 and "has no enable_thinking switch" in err


def test_ignore_eos(invoke):
    rc, _, _, calls, _ = invoke("--prompt", "x", "--ignore-eos")
    assert rc == 0 and calls[0][3]["eos_token_id"] is None


def test_report_keeps_compile_apart_from_decode(invoke, tok):
    stats = dict(prompt_tokens=2, new_tokens=11, decode_tokens=10, first_token_s=1.5, compile_s=2.5,
                 compile_first_s=1.25, prefill_s=0.25, decode_s=0.5)
    rc, _, err, _, _ = invoke("--prompt", "hello", stats=stats)
    assert rc == 0
    n = len(tok.encode("hello").ids)
    assert err.strip() == (f"prompt tokens: {n} | first token 1.500 s (compile 1.25 s, prefill 0.250 s) | "
                           f"decode 10 tokens in 0.500 s = 20.0 tok/s (+ 1.25 s compile, not counted)")


def test_only_the_projects_logs_are_shown(invoke, model_dir):
    import logging

    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    rc, _, err, _, _ = invoke("--prompt", "x")
    assert rc == 0 and (root.level, list(root.handlers)) == before  # the root logger is left alone
    err_stream = io.StringIO()
    cli.run(lambda d, *, dtype, fused: _LoggingRunner(d), ["--model", str(model_dir), "--prompt", "x"],
            out=io.StringIO(), err=err_stream)
    assert "twin's choice" in err_stream.getvalue() and "tpu" not in err_stream.getvalue()


class _LoggingRunner:
    def __init__(self, d):
        import logging

        self.config = Qwen3Config.from_pretrained(d)
        logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
        logging.getLogger("torch_impl").info("twin's choice")

    def generate(self, prompts, max_new_tokens, **kw):
        return [[40] for _ in prompts]


class OutOfMemoryError(RuntimeError):  # torch's name for it
    pass


@pytest.mark.parametrize("error", [OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
                                   RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")])
def test_out_of_memory_is_one_line(invoke, error):
    rc, _, err, _, _ = invoke("--prompt", "x", fail=error)
    assert rc == 2 and err.startswith("error: out of memory generating 1 prompt(s)")
    assert len(err.strip().splitlines()) == 1
    rc, _, err, _, _ = invoke("--prompt", "x", load_error=error)
    assert rc == 2 and "out of memory loading the weights" in err and len(err.strip().splitlines()) == 1


def test_other_runtime_errors_are_not_hidden(invoke):
    with pytest.raises(RuntimeError, match="a bug"):
        invoke("--prompt", "x", fail=RuntimeError("a bug"))


# ----- --warmup and --no-compile-cache -------------------------------------------------------------

def _run_recording_load(model_dir, tok, *args, warmup_s=0.0):
    """cli.run with a loader that takes the twins' extra keywords: (rc, err, load kwargs, calls)."""
    reply = tok.encode(REPLY).ids + [tok.token_to_id("<|im_end|>")]
    loads, calls = [], []

    def load(d, **kw):
        loads.append(kw)
        runner = FakeRunner(d, reply, calls)
        runner.warmup_s = warmup_s
        return runner

    err = io.StringIO()
    rc = cli.run(load, ["--model", str(model_dir), *args], prog="gen", out=io.StringIO(), err=err)
    return rc, err.getvalue(), loads, calls


def test_parse_warmup():
    assert cli.parse_warmup("1x512x256, 8X128x64,") == [(1, 512, 256), (8, 128, 64)]


@pytest.mark.parametrize("value, needle", [
    ("1x512", "'1x512' is not BATCHxPROMPTxNEW"),
    ("1x512x256x2", "'1x512x256x2' is not BATCHxPROMPTxNEW"),
    ("axbxc", "'axbxc' is not BATCHxPROMPTxNEW"),
    ("1x64x32,0x16x8", "'0x16x8': every number must be >= 1"),
    (",", "expected BATCHxPROMPTxNEW[,...]"),
    ("", "expected BATCHxPROMPTxNEW[,...]"),  # an empty value is an error, not "no warm-up"
    ("1x100000x10", "'1x100000x10': 100000 prompt tokens + 10 new tokens exceed the model's "
                    "max_position_embeddings=256"),
    ("1x16x8,2x250x7", "'2x250x7': 250 prompt tokens + 7 new tokens exceed"),
])
def test_bad_warmup_is_one_line(model_dir, tok, value, needle):
    rc, err, loads, calls = _run_recording_load(model_dir, tok, "--prompt", "x", "--warmup", value)
    assert rc == 2 and err.startswith("error: --warmup=") and len(err.strip().splitlines()) == 1, err
    assert value in err and needle in err and "Traceback" not in err, err
    assert not loads and not calls  # refused before loading the model


def test_warmup_compiles_with_the_commands_sampling(model_dir, tok):
    """--warmup's shapes reach load() with the sampling this command generates with, so the programs
    it warms are the ones it runs; the warm-up time is reported on a line of its own."""
    rc, err, loads, calls = _run_recording_load(
        model_dir, tok, "--prompt", "x", "--temperature", "0.6", "--top-k", "7", "--top-p", "0.8",
        "--warmup", "1x16x8,2x32x4", warmup_s=1.25)
    assert rc == 0, err
    sampling = dict(temperature=0.6, top_k=7, top_p=0.8)
    assert loads[0]["warmup"] == [dict(batch=1, prompt_tokens=16, new_tokens=8, **sampling),
                                  dict(batch=2, prompt_tokens=32, new_tokens=4, **sampling)], loads
    assert {k: calls[0][3][k] for k in sampling} == sampling
    assert "warm-up: 2 shape(s) compiled in 1.25 s\n" in err, err
    rc, err, loads, _ = _run_recording_load(model_dir, tok, "--prompt", "x", "--warmup", "1x16x8")
    assert rc == 0 and loads[0]["warmup"] == [dict(batch=1, prompt_tokens=16, new_tokens=8, temperature=0.0,
                                                   top_k=0, top_p=1.0)], loads  # greedy: no generation_config sampling
    rc, err, loads, _ = _run_recording_load(model_dir, tok, "--prompt", "x")
    assert rc == 0 and "warmup" not in loads[0] and "warm-up" not in err, (loads, err)


def test_no_compile_cache_reaches_the_loader(model_dir, tok):
    rc, _, loads, _ = _run_recording_load(model_dir, tok, "--prompt", "x", "--no-compile-cache")
    assert rc == 0 and loads[0]["compile_cache"] is False, loads
    rc, _, loads, _ = _run_recording_load(model_dir, tok, "--prompt", "x")
    assert rc == 0 and "compile_cache" not in loads[0], loads  # the twins' default: the cache on


# ----- a closed stdout pipe ------------------------------------------------------------------------

ENDLESS = """
import sys
sys.path.insert(0, {root!r})
from common.cli import main
from common.config import Qwen3Config

class Runner:  # streams until stdout's reader goes away
    def __init__(self, d):
        self.config = Qwen3Config.from_pretrained(d)
    def generate_stream(self, ids, max_new_tokens, **kw):
        for i in range(10 ** 7):  # past any budget: only a closed pipe ends it early
            yield [40 + i % 20]
        sys.stderr.write("generated all\\n")

main(lambda d, *, dtype, fused: Runner(d), prog="fakegen")
"""


def _closed_pipe_run(argv: list[str], read_first: bool) -> subprocess.CompletedProcess:
    """Run argv with stdout a real pipe whose reader goes away: after the first 8 bytes of text
    (`| head -c 8`), or before anything is written (read_first=False)."""
    import os

    r, w = os.pipe()
    if not read_first:
        os.close(r)
    p = subprocess.Popen(argv, stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    if read_first:
        with os.fdopen(r, "rb") as reader:
            reader.read(8)  # what `head -c 8` takes; it then closes the pipe
    err = p.communicate(timeout=300)[1]
    return subprocess.CompletedProcess(argv, p.returncode, "", err)


@pytest.mark.parametrize("read_first", [True, False])
def test_a_closed_stdout_pipe_stops_generation_quietly(model_dir, tmp_path, read_first):
    """`... | head -c 8`: no BrokenPipeError traceback, generation stops, exit status 0 (cli.EXIT_PIPE_CLOSED)."""
    script = tmp_path / "endless.py"
    script.write_text(ENDLESS.format(root=str(cli.Path(cli.__file__).resolve().parents[1])))
    p = _closed_pipe_run([sys.executable, str(script), "--model", str(model_dir), "--prompt", "x",
                          "--max-new-tokens", "200"], read_first)
    assert p.returncode == cli.EXIT_PIPE_CLOSED == 0, p.stderr
    assert "Traceback" not in p.stderr and "Broken pipe" not in p.stderr and "error" not in p.stderr, p.stderr
    assert "generated all" not in p.stderr  # stopped at the closed pipe, not after 10M tokens


def test_a_closed_pipe_in_a_batch_is_quiet_too(model_dir):
    class ClosedPipe(Recorder):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    load = lambda d, *, dtype, fused: FakeRunner(d, [40, 41], [])  # noqa: E731
    err = io.StringIO()
    rc = cli.run(load, ["--model", str(model_dir), "--prompt", "a", "--prompt", "b"], out=ClosedPipe(), err=err)
    assert rc == 0 and err.getvalue() == ""


@pytest.mark.parametrize("twin", ["jax_impl", "torch_impl"])
def test_the_twins_stop_at_a_closed_pipe(twin):
    """The README's `python -m torch_impl.generate --prompt "def main():" --max-new-tokens 300 | head -2`."""
    import os

    root = cli.Path(cli.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first token: the first write fails
    p = subprocess.Popen([sys.executable, "-m", f"{twin}.generate", "--prompt", "def main():", "--max-new-tokens",
                          "300"], stdout=w, stderr=subprocess.PIPE, text=True, cwd=root, env=env)
    os.close(w)
    err = p.communicate(timeout=600)[1]
    assert p.returncode == 0, err
    assert "Traceback" not in err and "Broken pipe" not in err and "tok/s" not in err, err


# ----- --seed's range ------------------------------------------------------------------------------

def test_seed_range_is_what_both_twins_take(invoke):
    from common.sampling import SEED_MAX

    assert SEED_MAX == 2 ** 63 - 1
    rc, _, err, calls, _ = invoke("--prompt", "x", "--seed", str(SEED_MAX), "--temperature", "1")
    assert rc == 0 and calls[0][3]["seed"] == SEED_MAX, err
    assert "[0, 2**63 - 1]" in cli.build_parser("gen").format_help()


@pytest.fixture(scope="module")
def twins(model_dir):
    """Both twins over the small checkpoint, float32, plain ops."""
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    import jax_impl
    import torch_impl

    return {"jax": jax_impl.load(model_dir, dtype="float32", fused=False),
            "torch": torch_impl.load(model_dir, dtype="float32", fused=False)}


@pytest.mark.parametrize("twin", ["jax", "torch"])
@pytest.mark.parametrize("seed", [1180591620717411303424, 2 ** 63, -1, 1.5, True])
def test_the_twins_name_a_bad_seed(twins, twin, seed):
    for call in (lambda r: r.generate([[1, 2]], 2, temperature=1.0, seed=seed),
                 lambda r: list(r.generate_stream([1, 2], 2, temperature=1.0, seed=seed))):
        with pytest.raises(GenerationArgsError) as e:
            call(twins[twin])
        assert str(e.value) == f"seed={seed!r}: expected an integer in [0, 2**63 - 1]"


@pytest.mark.parametrize("twin", ["jax", "torch"])
def test_the_twins_take_the_largest_seed(twins, twin):
    out = twins[twin].generate([[1, 2]], 3, temperature=1.0, seed=2 ** 63 - 1)
    assert len(out[0]) == 3


# ----- --warmup with the twins -----------------------------------------------------------------------

@pytest.mark.parametrize("twin", ["jax_impl", "torch_impl"])
def test_the_warmup_is_reported_once(model_dir, twin):
    import importlib

    pytest.importorskip(twin.split("_")[0])
    load = importlib.import_module(twin).load
    err = io.StringIO()
    rc = cli.run(load, ["--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "4", "--fused", "off",
                        "--dtype", "float32", "--no-compile-cache", "--warmup", "1x16x8"], out=io.StringIO(), err=err)
    assert rc == 0, err.getvalue()
    said = [line for line in err.getvalue().splitlines() if "warm-up" in line.lower() or "warmup" in line.lower()]
    assert len(said) == 1 and said[0].startswith("warm-up: 1 shape(s) "), err.getvalue()
