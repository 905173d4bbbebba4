//! The real model through the disaggregated path: SmolLM2-135M-Instruct (imported from
//! its GGUF by scripts/models.sh) on real daemons gives, for each data-plane backend,
//! exactly the greedy tokens of the one-process run: plain text, a chat rendered with
//! the model's template (ending at its `<|im_end|>`), and token ids.
use e2e::{args, client, deploy_args, smollm2, stream};
use engine::{ChatMessage, Engine, EngineConfig, SamplingParams, generate_local};
use kv_transfer::BackendKind;
use proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_equals_colocated_on_smollm2_for_every_backend() {
    let Some(model) = smollm2() else { return };
    let engine = Engine::load(&EngineConfig {
        model: model.clone(),
        kv_cache_mib: 64,
        ..Default::default()
    })
    .unwrap();
    let chat = [
        ChatMessage {
            role: "system".into(),
            content: "You are a concise assistant.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ];
    let code = engine.tokenize("def fibonacci(n):\n    ").unwrap();
    // (what is sent, its prompt ids as the one-process run sees them, the sampling)
    let greedy = |max_tokens, ignore_eos| SamplingParams {
        max_tokens,
        ignore_eos,
        ..Default::default()
    };
    let cases = [
        (
            pb::generate_request::Input::Text("The three primary colours are".into()),
            engine.tokenize("The three primary colours are").unwrap(),
            greedy(20, true),
        ),
        (
            pb::generate_request::Input::Chat(pb::Chat {
                messages: chat
                    .iter()
                    .map(|m| pb::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            }),
            engine.chat_prompt(&chat).unwrap(),
            greedy(64, false),
        ),
        (
            pb::generate_request::Input::TokenIds(pb::TokenIds { ids: code.clone() }),
            code,
            greedy(20, true),
        ),
    ];
    let references: Vec<_> = cases.iter().map(|(_, ids, p)| generate_local(&engine, ids, p).unwrap()).collect();
    // The chat ends by itself, on the template's end-of-turn token, before its budget.
    let chat_ref = &references[1];
    assert_eq!(chat_ref.finish_reason.as_str(), "eos", "{}", chat_ref.text);
    assert!(chat_ref.tokens.len() < 64 && chat_ref.text.contains("Paris"), "{}", chat_ref.text);

    for backend in [BackendKind::Tcp, BackendKind::Ucx, BackendKind::Nixl] {
        let mut a = args(backend, 1, 1, 64);
        a.placement.model = Some(model.clone());
        let (dep, _work) = deploy_args(a).await;
        let mut c = client(&dep.router).await;
        for ((input, ids, params), want) in cases.iter().zip(&references) {
            let (chunks, r) = stream(&mut c, e2e::request(input.clone(), params)).await.unwrap();
            assert_eq!(r.token_ids, want.tokens, "{backend:?}: {input:?}");
            assert_eq!(chunks, want.tokens, "{backend:?}: streamed chunks");
            assert_eq!(r.prompt_tokens as usize, ids.len(), "{backend:?}: {input:?}");
            assert_eq!(r.text, want.text, "{backend:?}");
            assert_eq!(r.kv_backend, backend.to_string());
            assert!(r.timings.unwrap().kv_bytes > 0, "{backend:?}: the KV moved");
        }
        for (name, code) in dep.stop().await {
            assert_eq!(code, Some(0), "{backend:?}: {name} exits 0");
        }
    }
}
