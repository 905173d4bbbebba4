//! GGUF import without the network: synthetic Hugging Face models written as llama.cpp
//! would write them, imported back, and compared with where they started; and bad files,
//! each refused with a clear error and nothing left behind.
mod common;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use common::{Options, leftovers, read_safetensors, write_gguf};
use engine::synth::{Preset, synthesize};
use engine::{Arch, Engine, EngineConfig, ModelConfig, SamplingParams, generate_local};
use models::{Dtype, ModelsError, import_gguf};

/// A tiny synthetic model of `arch`, its GGUF, and a scratch folder.
fn setup(arch: Arch, o: &Options) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    synthesize(arch, Preset::Tiny, 3, &hf).unwrap();
    let gguf = tmp.path().join("model.gguf");
    write_gguf(&hf, &gguf, o);
    (tmp, hf, gguf)
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (x, y) = (read_safetensors(a), read_safetensors(b));
    let mut names: Vec<&String> = x.keys().collect();
    names.sort();
    assert_eq!(names.len(), y.len(), "tensor count");
    for n in names {
        let (t, u) = (&x[n], y.get(n).unwrap_or_else(|| panic!("{n} missing from the import")));
        assert_eq!(t.dims(), u.dims(), "{n}");
        let (t, u) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(t == u, "{n}: values differ");
    }
}

fn greedy(dir: &Path, prompt: &str) -> Vec<u32> {
    let e = Engine::load(&EngineConfig {
        model: dir.to_path_buf(),
        kv_cache_mib: 16,
        ..Default::default()
    })
    .unwrap();
    let ids = e.tokenize(prompt).unwrap();
    let p = SamplingParams {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    generate_local(&e, &ids, &p).unwrap().tokens
}

#[test]
fn llama_round_trips_through_gguf() {
    let (tmp, hf, gguf) = setup(Arch::Llama, &Options::default());
    let out = tmp.path().join("imported");
    let r = import_gguf(&gguf, &out, Dtype::F32).unwrap();
    assert_eq!((r.architecture.as_str(), r.layers), ("llama", 2));
    assert!(r.bytes > 0 && r.parameters > 0);
    // q/k rows are back in Hugging Face's order: every tensor equals the original.
    assert_same_weights(&hf, &out);
    let (a, b) = (
        ModelConfig::from_file(&hf.join("config.json")).unwrap(),
        ModelConfig::from_file(&out.join("config.json")).unwrap(),
    );
    assert_eq!(a, b, "the engine reads the same config");
    // The tokenizer encodes and decodes as the original (with BOS, as add_bos_token says).
    let (ta, tb) = (
        tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap(),
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap(),
    );
    for text in [
        "The quick brown fox",
        "Numbers: 2026 and 12345.",
        "Bonjour, 世界! 🚀",
        "  spaces\n\nand lines",
    ] {
        let (ea, eb) = (ta.encode(text, true).unwrap(), tb.encode(text, true).unwrap());
        assert_eq!(ea.get_ids(), eb.get_ids(), "{text:?}");
        assert_eq!(eb.get_ids()[0], 1, "BOS first");
        assert_eq!(tb.decode(eb.get_ids(), true).unwrap(), text);
    }
    // And the engine generates the same tokens from both directories.
    let prompt = "Disaggregated serving moves the KV cache";
    assert_eq!(greedy(&hf, prompt), greedy(&out, prompt));
    let tkc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tkc["bos_token"], "<s>");
    assert_eq!(tkc["eos_token"], "</s>");
    assert_eq!(tkc["add_bos_token"], true);
    assert!(tkc["chat_template"].as_str().unwrap().contains("messages"));
    let generation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(generation["eos_token_id"], serde_json::json!([2]));
    assert!(leftovers(tmp.path(), ".imported.").is_empty(), "no staging folder left");
}

#[test]
fn qwen2_is_not_unpermuted_and_keeps_its_biases() {
    let o = Options {
        arch: "qwen2",
        pre: "qwen2",
        permute: false,
        ..Options::default()
    };
    let (tmp, hf, gguf) = setup(Arch::Qwen2, &o);
    let out = tmp.path().join("imported");
    import_gguf(&gguf, &out, Dtype::F32).unwrap();
    assert_same_weights(&hf, &out);
    let c = ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(c.arch, Arch::Qwen2);
    assert!(c.qkv_bias);
    // Qwen2's pre-tokenizer (single digits) differs from the synthetic GPT-2 one, so
    // compare the engine on token ids, not text.
    let e = Engine::load(&EngineConfig {
        model: out.clone(),
        kv_cache_mib: 16,
        ..Default::default()
    })
    .unwrap();
    let f = Engine::load(&EngineConfig {
        model: hf.clone(),
        kv_cache_mib: 16,
        ..Default::default()
    })
    .unwrap();
    let ids = [1u32, 50, 60, 70, 80];
    let p = SamplingParams {
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    assert_eq!(
        generate_local(&e, &ids, &p).unwrap().tokens,
        generate_local(&f, &ids, &p).unwrap().tokens
    );
}

#[test]
fn bf16_and_quantized_imports() {
    let o = Options {
        quant: GgmlDType::Q8_0,
        ..Options::default()
    };
    let (tmp, hf, gguf) = setup(Arch::Llama, &o);
    let out = tmp.path().join("bf16");
    let r = import_gguf(&gguf, &out, Dtype::Bf16).unwrap();
    let st = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert!(st.tensors().iter().all(|(_, t)| t.dtype() == safetensors::Dtype::BF16));
    let c = ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(c.stored_dtype, "bfloat16");
    assert!(r.bytes < std::fs::metadata(hf.join("model.safetensors")).unwrap().len());
    // Q8_0 then bf16: close to the original, not equal.
    let (a, b) = (read_safetensors(&hf), read_safetensors(&out));
    for (n, t) in &a {
        let d = (t - &b[n]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let m = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 0.02 * m, "{n}: |diff| {d} against max {m}");
    }
}

/// Runs an import that must fail; checks the error and that nothing was left.
fn refused(gguf: &Path, scratch: &Path) -> ModelsError {
    let out = scratch.join("out");
    let e = import_gguf(gguf, &out, Dtype::F32).unwrap_err();
    assert!(!out.exists(), "{} exists after a failed import", out.display());
    assert!(leftovers(scratch, ".out.").is_empty(), "staging folder left behind");
    let text = e.to_string();
    assert!(text.contains(&gguf.display().to_string()), "error names the file: {text}");
    e
}

#[test]
fn truncated_files_are_refused() {
    let (tmp, _, gguf) = setup(Arch::Llama, &Options::default());
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = tmp.path().join("cut.gguf");
    // In the tensor data: found before anything is written.
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).unwrap();
    let e = refused(&cut, tmp.path()).to_string();
    assert!(e.contains("truncated"), "{e}");
    // In the metadata.
    std::fs::write(&cut, &bytes[..200]).unwrap();
    let e = refused(&cut, tmp.path()).to_string();
    assert!(e.contains("cannot read the GGUF header"), "{e}");
}

/// A file whose metadata claims an absurd shape is refused before any loop or
/// allocation follows it.
#[test]
fn forged_shapes_are_refused() {
    for (key, v) in [
        ("block_count", 1_000_000_000),
        ("attention.head_count", 0),
        ("embedding_length", u32::MAX),
    ] {
        let o = Options {
            forge: vec![(key, v)],
            ..Options::default()
        };
        let (tmp, _, gguf) = setup(Arch::Llama, &o);
        let e = refused(&gguf, tmp.path()).to_string();
        assert!(e.contains(key), "{key} = {v}: {e}");
    }
}

#[test]
fn wrong_magic_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, b"GGML\x01\x00\x00\x00 not a gguf at all").unwrap();
    let e = refused(&bad, tmp.path()).to_string();
    assert!(e.contains("not a GGUF file") && e.contains("GGML"), "{e}");
    std::fs::write(&bad, b"").unwrap();
    assert!(refused(&bad, tmp.path()).to_string().contains("not a GGUF file"));
}

#[test]
fn unsupported_architecture_is_refused() {
    let o = Options {
        arch: "falcon",
        ..Options::default()
    };
    let (tmp, _, gguf) = setup(Arch::Llama, &o);
    let e = refused(&gguf, tmp.path());
    assert!(
        matches!(&e, ModelsError::UnsupportedArchitecture { arch, .. } if arch == "falcon"),
        "{e}"
    );
    assert!(e.to_string().contains("supported: llama, qwen2"), "{e}");
}

#[test]
fn sentencepiece_tokenizer_is_refused() {
    let o = Options {
        tokenizer_model: "llama",
        ..Options::default()
    };
    let (tmp, _, gguf) = setup(Arch::Llama, &o);
    let e = refused(&gguf, tmp.path());
    assert!(
        matches!(&e, ModelsError::UnsupportedTokenizer { model, .. } if model == "llama"),
        "{e}"
    );
    assert!(e.to_string().contains("only byte-level BPE"), "{e}");
}

#[test]
fn unknown_pre_tokenizer_is_refused() {
    let o = Options {
        pre: "mystery-bpe",
        ..Options::default()
    };
    let (tmp, _, gguf) = setup(Arch::Llama, &o);
    let e = refused(&gguf, tmp.path()).to_string();
    assert!(e.contains("mystery-bpe") && e.contains("not supported"), "{e}");
}

#[test]
fn an_existing_output_is_never_overwritten() {
    let (tmp, _, gguf) = setup(Arch::Llama, &Options::default());
    let out = tmp.path().join("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = import_gguf(&gguf, &out, Dtype::F32).unwrap_err();
    assert!(matches!(e, ModelsError::OutputExists { .. }), "{e}");
    assert!(e.to_string().contains("not an empty directory"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // A file in the way is refused too; an empty directory is filled.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(matches!(
        import_gguf(&gguf, &file, Dtype::F32),
        Err(ModelsError::OutputExists { .. })
    ));
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    import_gguf(&gguf, &empty, Dtype::F32).unwrap();
    assert!(empty.join("model.safetensors").exists());
}
