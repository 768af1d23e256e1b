"""Hugging Face models in and out: a tiny transformers model (built from a config, no download) is
imported with `mimo-ckpt import --format hf` under a layout, loaded by megatron-core's GPTModel
under that layout on 4 gloo ranks (tests/hf_worlds.py), whose logits must match transformers'
forward; trained one step there, saved, and exported with `mimo-ckpt export --format hf`:
`from_pretrained` loads it with no missing or unexpected key, with logits matching megatron's."""

import json
import os
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from mimo_ckpt import CheckpointExistsError, ModuleLayout  # noqa: E402
from mimo_ckpt.errors import MappingError  # noqa: E402
from mimo_ckpt.interop.hf import export_hf, import_hf  # noqa: E402
from mimo_ckpt.interop.hf_map import padded_rows  # noqa: E402
from mimo_ckpt.io.commit import read_manifest  # noqa: E402
from mimo_ckpt.io.storage import LocalStorage  # noqa: E402
from mimo_ckpt.io.stream import Budget  # noqa: E402
from mimo_ckpt.cli import main as cli  # noqa: E402
from tests.harness.local_world import run_local_world  # noqa: E402

TOL = 1e-5
VOCAB_MULTIPLE = 8
SIZES = {
    "llama": {"hidden": 32, "heads": 4, "groups": 2, "layers": 2, "ffn": 64, "vocab": 70, "seq": 12},
    "gpt2": {"hidden": 32, "heads": 4, "layers": 2, "vocab": 70, "seq": 12},
}
CASES = [  # (architecture, layout written by the import, train one step)
    ("llama", "tp2,pp2", True),
    ("llama", "tp2,dp2", False),
    ("gpt2", "tp2,pp2", False),
    ("gpt2", "tp4", True),
]
BUDGET = Budget(4 << 10, 4 << 10)  # small pieces: every tensor crosses several


def hf_model(arch):
    """A tiny model with weights far from their initialisation (so a wrong mapping shows)."""
    s = SIZES[arch]
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=s["hidden"], num_attention_heads=s["heads"], num_key_value_heads=s["groups"],
            num_hidden_layers=s["layers"], intermediate_size=s["ffn"], vocab_size=s["vocab"],
            max_position_embeddings=s["seq"], rms_norm_eps=1e-5, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.GPT2Config(n_embd=s["hidden"], n_head=s["heads"], n_layer=s["layers"],
                                         vocab_size=s["vocab"], n_positions=s["seq"], layer_norm_epsilon=1e-5,
                                         bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        cls = transformers.GPT2LMHeadModel
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name or ".ln_" in name
            p.copy_((1.0 if norm and name.endswith("weight") else 0.0) + (0.1 if norm else 0.3) * torch.randn_like(p))
    return model


def tokens(arch):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SIZES[arch]["vocab"], (3, SIZES[arch]["seq"]), generator=g)


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def hf_llava():
    """A LLaVA of the MimoModel example's sizes (examples/megatron_mimo.py, TINY): CLIP ViT of 4x4
    images in 2x2 patches, features with the class token, Llama-class language model."""
    vision = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=4, patch_size=2, hidden_act="gelu",
                                           layer_norm_eps=1e-5)
    text = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                                    intermediate_size=64, vocab_size=70, rms_norm_eps=1e-5, max_position_embeddings=16)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=69,
                                      projector_hidden_act="gelu", vision_feature_layer=-1,
                                      vision_feature_select_strategy="full")
    config._attn_implementation = "eager"
    torch.manual_seed(2)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "norm" in name or "layrnorm" in name or "layer_norm" in name
            p.copy_((1.0 if norm and name.endswith("weight") else 0.0) + (0.1 if norm else 0.3) * torch.randn_like(p))
    return model


def _llava_case(root):
    """An HF LLaVA imported as the example's two modules at different layouts (the example's
    saved ones: images TP2 on ranks 0-1, language PP2 on ranks 2-3)."""
    hf_llava().save_pretrained(root / "llava-hf")
    imported = root / "llava-imported"
    assert cli(["import", str(root / "llava-hf"), str(imported), "--format", "hf", "--module", "images=tp2",
                "--module", "language=pp2,offset=2", "--vocab-multiple", str(VOCAB_MULTIPLE), "--quiet"]) == 0
    return {"imported": str(imported), "trained": str(root / "llava-trained"), "step": 7,
            "logits": str(root / "llava-logits.safetensors"),
            "trained_logits": str(root / "llava-trained-logits.safetensors")}


def llava_logits(model, step):
    from examples.megatron_mimo import global_batch

    batch = global_batch(step)
    with torch.no_grad():
        return model(input_ids=batch["tokens"], pixel_values=batch["images"]).logits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every case's import (CLI), megatron forward, training step and save, in one 4-rank world."""
    root = tmp_path_factory.mktemp("hf")
    args, expected = [], {}
    for arch in SIZES:
        folder = root / f"{arch}-hf"
        hf_model(arch).save_pretrained(folder)
    for arch, layout, train in CASES:
        name = f"{arch}-{layout}"
        ckpt = root / f"{name}-imported"
        assert cli(["import", str(root / f"{arch}-hf"), str(ckpt), "--format", "hf", "--module", f"language={layout}",
                    "--vocab-multiple", str(VOCAB_MULTIPLE), "--quiet"]) == 0
        parsed = ModuleLayout.from_json(read_manifest(LocalStorage(ckpt)).modules["language"].layout.to_json())
        args.append({
            "arch": arch, "layout": parsed.to_json(), "sizes": SIZES[arch], "ckpt": str(ckpt),
            "padded_vocab": padded_rows(SIZES[arch]["vocab"], VOCAB_MULTIPLE, parsed.tp),
            "tokens": tokens(arch).tolist(), "logits": str(root / f"{name}-logits.safetensors"), "train": train,
            "trained_logits": str(root / f"{name}-trained-logits.safetensors"),
            "trained_ckpt": str(root / f"{name}-trained"), "keep_metadata": arch == "llama",
        })
        expected[name] = dict(args[-1], index=len(args) - 1)
    example = {"steps": 2, "ckpt": str(root / "example"), "logits": str(root / "example-logits.safetensors"),
               "tokens": tokens("llama").clamp(max=68).tolist()}  # 69 is the example's image token
    llava_args = _llava_case(root)
    results = run_local_world(4, "tests.hf_worlds:suite", {"cases": args, "example": example, "llava": llava_args},
                              timeout=600)
    expected["example"], expected["llava"] = example, llava_args
    return root, expected, [r["cases"] for r in results]


@pytest.mark.parametrize(("arch", "layout", "train"), CASES)
def test_megatron_loads_the_import_and_matches_transformers_forward(world, arch, layout, train):
    root, expected, results = world
    case = expected[f"{arch}-{layout}"]
    for rank_results in results:
        r = rank_results[case["index"]]
        if r:
            assert r["nan_params"] == 0
            # objects of Transformer Engine layers; an import has none, and a local-spec model none to fill
            assert all(k.endswith("._extra_state") for keys in r["not_loaded"].values() for k in keys)
    megatron = load_file(case["logits"])["logits"]
    reference = hf_logits(hf_model(arch), tokens(arch))
    assert megatron.shape == reference.shape
    assert (megatron - reference).abs().max().item() < TOL


# The llama case saves the Hugging Face metadata its load returned, so the export needs no flags;
# the gpt2 case saves none, like a model trained from scratch: the export is told the table and
# the sizes shapes cannot give.
EXPORT_FLAGS = {"llama": [], "gpt2": ["--table", "gpt2", "--set", "n_head=4", "--set", "vocab_size=70"]}


@pytest.mark.parametrize(("arch", "layout"), [(a, l) for a, l, train in CASES if train])
def test_a_trained_model_exports_as_a_folder_transformers_loads_with_megatrons_logits(world, arch, layout, capsys):
    root, expected, _ = world
    case = expected[f"{arch}-{layout}"]
    out = root / f"{arch}-{layout}-exported"
    export = ["export", case["trained_ckpt"], "--module", "language", "--to", str(out), "--quiet"]
    if EXPORT_FLAGS[arch]:
        assert cli(export) == 2
        assert "record no mapping table" in capsys.readouterr().err
        assert not (out / "model.safetensors.index.json").exists()
    assert cli(export + EXPORT_FLAGS[arch]) == 0
    cls = type(hf_model(arch))
    model, info = cls.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    trained = load_file(case["trained_logits"])["logits"]
    before = load_file(case["logits"])["logits"]
    assert (trained - before).abs().max().item() > 100 * TOL  # the step changed the model
    assert (hf_logits(model.eval(), tokens(arch)) - trained).abs().max().item() < TOL


def test_the_mimo_examples_language_model_exports_as_llama_with_megatrons_logits(world):
    """The example's language module, trained by MimoModel at TP2 x DP2 and saved by mimo_ckpt,
    exported with the llama table: the folder transformers loads gives megatron's logits."""
    root, expected, _ = world
    example = expected["example"]
    out = root / "example-hf"
    assert cli(["export", example["ckpt"], "--module", "language", "--to", str(out), "--table", "llama",
                "--set", "num_attention_heads=4", "--set", "vocab_size=70", "--quiet"]) == 0
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.tensor(example["tokens"])
    megatron = load_file(example["logits"])["logits"]
    assert (hf_logits(model.eval(), x) - megatron).abs().max().item() < TOL


def test_an_hf_llava_imported_as_two_modules_gives_transformers_logits_in_the_mimo_example(world):
    """LLaVA's vision tower + projector and its language model, imported at two layouts: the
    example's MimoModel (megatron's CLIP ViT, projector, GPTModel) gives transformers' logits."""
    _, expected, _ = world
    case = expected["llava"]
    megatron = load_file(case["logits"])["logits"]
    reference = llava_logits(hf_llava(), case["step"])
    assert megatron.shape == reference.shape
    assert (megatron - reference).abs().max().item() < TOL


def test_the_llava_trained_in_the_mimo_example_exports_as_one_hf_vlm_with_megatrons_logits(world):
    _, expected, _ = world
    case = expected["llava"]
    out = pathlib.Path(case["trained"] + "-hf")
    assert cli(["export", case["trained"], "--to", str(out), "--quiet"]) == 0  # both modules, by the recorded table
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    trained = load_file(case["trained_logits"])["logits"]
    assert (trained - load_file(case["logits"])["logits"]).abs().max().item() > 100 * TOL
    assert (llava_logits(model.eval(), case["step"]) - trained).abs().max().item() < TOL


def test_optimizer_state_exports_on_request_mapped_like_the_weights(world):
    """`--optimizer`: Adam's moments beside the model, under the weights' Hugging Face names; the
    q rows of the fused QKV's exp_avg, checked against megatron's per-group layout directly."""
    root, expected, _ = world
    trained = expected["llava"]["trained"]
    out, raw = root / "llava-with-optimizer", root / "llava-raw"
    assert cli(["export", trained, "--to", str(out), "--optimizer", "--quiet"]) == 0
    assert cli(["export", trained, "--module", "language", "--format", "safetensors", "--to", str(raw), "--quiet"]) == 0
    index = json.loads((out / "optimizer.safetensors.index.json").read_text())
    weights = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.startswith("optimizer.") for n in weights)
    for state in ("exp_avg", "exp_avg_sq"):
        assert {n for n in weights if "post_layernorm" not in n} == {
            n.removeprefix(f"optimizer.{state}.") for n in index["weight_map"] if n.startswith(f"optimizer.{state}.")}
    name = "optimizer.exp_avg.language_model.model.layers.1.self_attn.q_proj.weight"
    got = load_file(out / index["weight_map"][name])[name]
    stored = load_file(raw / "model-00001-of-00001.safetensors")
    qkv = stored["optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight"][1]
    groups, hd = 4, 8  # the example's language model: 4 heads, no grouping, head dim 8
    reference = qkv.view(groups, 3, hd, -1)[:, 0].reshape(-1, qkv.shape[-1])
    assert got.abs().sum() > 0 and torch.equal(got, reference)
    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("arch", sorted(SIZES))
def test_import_then_export_gives_back_every_tensor_bit_for_bit(tmp_path, arch):
    model = hf_model(arch)
    model.save_pretrained(tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": ModuleLayout(tp=2, pp=2)},
              vocab_multiple=VOCAB_MULTIPLE, budget=BUDGET, progress=False)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), ["lm"], budget=BUDGET, progress=False)
    back, info = type(model).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = model.state_dict()
    assert set(back.state_dict()) == set(original)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == SIZES[arch]["vocab"] and config["model_type"] == arch


def test_qkv_rows_follow_megatrons_per_group_order(tmp_path):
    """Independent reference: megatron's fused QKV stacks, per query group, the group's query
    heads, then its key head, then its value head."""
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": ModuleLayout()}, vocab_multiple=VOCAB_MULTIPLE,
              budget=BUDGET, progress=False)
    assert cli(["export", str(tmp_path / "ckpt"), "--module", "lm", "--format", "safetensors", "--to",
                str(tmp_path / "raw"), "--quiet"]) == 0  # the stored tensors as they are
    stored = load_file(tmp_path / "raw" / "model-00001-of-00001.safetensors")
    s = SIZES["llama"]
    hd, groups = s["hidden"] // s["heads"], s["groups"]
    attn = model.model.layers[1].self_attn
    q = attn.q_proj.weight.view(groups, -1, s["hidden"])
    k = attn.k_proj.weight.view(groups, hd, s["hidden"])
    v = attn.v_proj.weight.view(groups, hd, s["hidden"])
    reference = torch.cat([q, k, v], dim=1).reshape(-1, s["hidden"])
    assert torch.equal(stored["decoder.layers.self_attention.linear_qkv.weight"][1], reference)
    mlp = model.model.layers[0].mlp
    assert torch.equal(stored["decoder.layers.mlp.linear_fc1.weight"][0], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    embedding = stored["embedding.word_embeddings.weight"]
    assert embedding.shape[0] == 72 and torch.equal(embedding[:70], model.model.embed_tokens.weight)
    assert not embedding[70:].any()


def test_import_refuses_a_folder_tensor_no_rule_takes(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "hf")
    extra = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(extra)
    tensors["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(4)
    from safetensors.torch import save_file
    save_file(tensors, extra, metadata={"format": "pt"})
    with pytest.raises(MappingError, match="inv_freq"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": ModuleLayout()}, budget=BUDGET, progress=False)
    assert not (tmp_path / "ckpt" / "manifest.json").exists()
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": ModuleLayout()}, ignore="inv_freq$",
              budget=BUDGET, progress=False)


def test_import_names_the_missing_tensor_and_writes_nothing(tmp_path):
    model = hf_model("llama")
    model.save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MappingError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": ModuleLayout(tp=2)}, budget=BUDGET, progress=False)
    assert not (tmp_path / "ckpt").exists() or os.listdir(tmp_path / "ckpt") == []


@pytest.mark.parametrize(("layout", "message"), [(ModuleLayout(pp=4), "pp=4"),  # 2 layers in 4 stages
                                                  (ModuleLayout(tp=4), "2 groups")])  # 2 key/value heads
def test_a_layout_megatron_cannot_build_is_refused(tmp_path, layout, message):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    with pytest.raises(MappingError, match=message):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": layout}, budget=BUDGET, progress=False)
    assert not (tmp_path / "ckpt" / "manifest.json").exists()


def test_an_export_never_writes_into_a_committed_folder(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": ModuleLayout()}, budget=BUDGET, progress=False)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), ["lm"], budget=BUDGET, progress=False)
    before = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
    with pytest.raises(CheckpointExistsError):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), ["lm"], budget=BUDGET, progress=False)
    assert {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")} == before


OFFLINE_POINTS = ["offline.start", "offline.write", "offline.commit"]


@pytest.fixture(scope="module")
def crash_sources(tmp_path_factory):
    """A Hugging Face folder, its import, and the export of that import, each written once
    without faults: the references a killed and re-run writer must reproduce."""
    root = tmp_path_factory.mktemp("hf-crash")
    hf_model("llama").save_pretrained(root / "hf")
    import_hf(str(root / "hf"), str(root / "imported"), {"lm": ModuleLayout(tp=2, pp=2)}, budget=BUDGET,
              progress=False)
    export_hf(str(root / "imported"), str(root / "exported"), ["lm"], budget=BUDGET, progress=False)
    return root


def _folder_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(os.listdir(folder)) == sorted({*index["weight_map"].values(), "model.safetensors.index.json",
                                                 "config.json"})
    out = {}
    for name in set(index["weight_map"].values()):
        out.update(load_file(folder / name))
    return out


@pytest.mark.parametrize("point", OFFLINE_POINTS)
@pytest.mark.parametrize("signal", ["kill", "int"])
@pytest.mark.parametrize("writer", ["import", "export"])
def test_a_killed_hf_writer_reruns_to_the_same_result(crash_sources, tmp_path, writer, point, signal):
    from tests.commit_cases import run_forked, tree_hashes

    root, out = crash_sources, tmp_path / "out"
    if writer == "import":
        args = ["import", str(root / "hf"), str(out), "--format", "hf", "--module", "lm=tp2,pp2", "--quiet"]
    else:
        args = ["export", str(root / "imported"), "--module", "lm", "--to", str(out), "--max-shard-size", "8K",
                "--quiet"]
    before = tree_hashes(root)
    code = run_forked(lambda: cli(args), fault=f"{point}@0{':int' if signal == 'int' else ''}")
    assert code == (-9 if signal == "kill" else 130)
    assert run_forked(lambda: cli(args)) == 0
    assert tree_hashes(root) == before  # the sources and the references: not a byte changed
    if writer == "import":
        assert cli(["diff", str(root / "imported"), str(out), "--quiet"]) == 0
        assert not [n for n in os.listdir(out) if n.startswith(".saving-")]
    else:
        got, want = _folder_tensors(out), _folder_tensors(root / "exported")
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_an_hf_import_composes_with_native_modules_and_keeps_its_mapping(world):
    """A language model imported from Hugging Face and the example's trained vision module (a
    native save), composed into one checkpoint with the files shared: the language module still
    exports by itself, by the mapping recorded at import."""
    root, expected, _ = world
    imported, native = expected["llama-tp2,pp2"]["ckpt"], expected["example"]["ckpt"]
    composed = root / "composed"
    assert cli(["compose", str(composed), "--module", f"language={imported}", "--module", f"images={native}",
                "--quiet"]) == 0
    manifest = read_manifest(LocalStorage(composed))
    assert sorted(manifest.metadata["hf"]) == ["language"] and manifest.metadata["hf"]["language"]["table"] == "llama"
    shard = next(iter(manifest.modules["language"].tensors.values())).shards[0].file
    assert os.path.samefile(composed / shard, pathlib.Path(imported) / shard)
    assert cli(["export", str(composed), "--module", "language", "--to", str(root / "composed-hf"), "--quiet"]) == 0
    assert cli(["export", imported, "--module", "language", "--to", str(root / "imported-hf"), "--quiet"]) == 0
    got, want = _folder_tensors(root / "composed-hf"), _folder_tensors(root / "imported-hf")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_users_own_table_extends_llama_to_qwen2_without_code(tmp_path):
    """Qwen2 is Llama-class with q/k/v biases: a copy of the llama table with three more rows
    (and its model_type) imports and exports it."""
    from mimo_ckpt.interop.hf_table import TABLES_DIR

    table = json.loads(pathlib.Path(TABLES_DIR, "llama.json").read_text())
    table["name"] = "qwen2"
    table["config"].update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    table["megatron"]["decoder.layers.self_attention.linear_qkv.bias"] = {"layers": True, "tp": 0}
    table["tensors"] += [{"hf": f"model.layers.{{layer}}.self_attn.{r}_proj.bias", "rows": r,
                          "megatron": "decoder.layers.self_attention.linear_qkv.bias"} for r in "qkv"]
    (tmp_path / "qwen2.json").write_text(json.dumps(table))
    s = SIZES["llama"]
    config = transformers.Qwen2Config(hidden_size=s["hidden"], num_attention_heads=s["heads"],
                                      num_key_value_heads=s["groups"], num_hidden_layers=s["layers"],
                                      intermediate_size=s["ffn"], vocab_size=s["vocab"], tie_word_embeddings=False)
    torch.manual_seed(3)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(MappingError, match="q_proj.bias"):  # the llama table does not take the biases
        import_hf(str(tmp_path / "hf"), str(tmp_path / "refused"), {"lm": ModuleLayout(tp=2)}, table="llama",
                  budget=BUDGET, progress=False)
    user_table = str(tmp_path / "qwen2.json")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), {"lm": ModuleLayout(tp=2, pp=2)}, table=user_table,
              budget=BUDGET, progress=False)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), ["lm"], table=user_table, budget=BUDGET, progress=False)
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens("llama")
    assert torch.equal(hf_logits(back, x), hf_logits(model, x))
