//! Property tests: arbitrary well-formed requests with extreme field values, fed to the
//! validation module and to the real daemons' handlers (router, decode-server, the
//! prefill-server's EarlyPrefill). Nothing panics, and the only answers are
//! INVALID_ARGUMENT, RESOURCE_EXHAUSTED or OK; the daemons stay healthy and hold no
//! blocks afterwards.
use std::sync::Arc;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proto::v1 as pb;
use tonic::Code;

fn extreme_f32() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![
        Just(None),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            f32::MAX,
            1e-30
        ])
        .prop_map(Some),
        any::<f32>().prop_map(Some),
    ]
}

fn sampling() -> impl Strategy<Value = Option<pb::SamplingParameters>> {
    let fields = (
        extreme_f32(),
        prop::option::of(any::<u32>()),
        extreme_f32(),
        extreme_f32(),
        prop::option::of(any::<u64>()),
        // Mostly small max_tokens, so that the valid requests finish fast.
        prop_oneof![Just(None), (0u32..4).prop_map(Some), any::<u32>().prop_map(Some)],
        prop::collection::vec(prop_oneof![".{0,4}", ".{250,300}"], 0..20),
        prop::option::of(any::<bool>()),
    );
    prop::option::of(
        fields.prop_map(|(t, k, p, r, seed, max_tokens, stop, ignore_eos)| pb::SamplingParameters {
            temperature: t,
            top_k: k,
            top_p: p,
            repetition_penalty: r,
            seed,
            max_tokens,
            stop,
            ignore_eos,
        }),
    )
}

fn request() -> impl Strategy<Value = pb::GenerateRequest> {
    let input = prop_oneof![
        Just(None),
        "\\PC{0,64}".prop_map(|t| Some(pb::generate_request::Input::Text(t))),
        prop::collection::vec(prop_oneof![0u32..600, any::<u32>()], 0..80)
            .prop_map(|ids| Some(pb::generate_request::Input::TokenIds(pb::TokenIds { ids }))),
    ];
    let salt = prop_oneof![Just(String::new()), ".{0,300}"];
    (
        prop_oneof![Just(String::new()), "[a-z0-9-]{1,20}", ".{0,200}"],
        input,
        sampling(),
        salt,
    )
        .prop_map(|(request_id, input, sampling, cache_salt)| pb::GenerateRequest {
            request_id,
            input,
            sampling,
            cache_salt,
        })
}

fn allowed(code: Code) -> bool {
    matches!(code, Code::Ok | Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_routers_validation_answers_every_request(req in request()) {
        let routed = daemon::validate::routed(&req);
        prop_assert!(allowed(routed.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code())), "{routed:?}");
    }
}

/// The model-side checks, tokenizing included, on the reference engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_side_validation_answers_every_request() {
    let engine = Arc::new(
        engine::Engine::load(&engine::EngineConfig {
            model: e2e::model(),
            kv_cache_mib: 8,
            ..Default::default()
        })
        .unwrap(),
    );
    let limits = daemon::validate::Limits {
        max_prompt_tokens: engine.max_model_len(),
        max_tokens_limit: 4096,
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    });
    let strategy = request();
    for _ in 0..512 {
        let req = strategy.new_tree(&mut runner).unwrap().current();
        let out = daemon::validate::generate(&engine, &req, limits).await;
        let code = out.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        assert!(allowed(code), "{req:?}: {out:?}");
        if let Ok((tokens, params)) = out {
            // What passed is what the engine can run.
            assert!(!tokens.is_empty() && tokens.len() <= limits.max_prompt_tokens);
            assert!(params.max_tokens >= 1 && params.max_tokens <= 4096);
        }
    }
}

/// The same requests at the real daemons' handlers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_answer_every_request() {
    let (dep, _work) = e2e::deploy(kv_transfer::BackendKind::Tcp, 1, 1, 64).await;
    let mut router = e2e::client(&dep.router).await;
    let mut decode = e2e::client(&dep.decode[0]).await;
    let mut prefill = proto::v1::prefill_client::PrefillClient::connect(dep.prefill[0].clone())
        .await
        .unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::default());
    let strategy = request();
    for i in 0..64 {
        let mut req = strategy.new_tree(&mut runner).unwrap().current();
        if !req.request_id.is_empty() && daemon::validate::request_id(&req.request_id).is_ok() {
            // Ids unique per case: the early prefill of one must not be claimed by another.
            req.request_id = format!("p{i}");
        }
        for (name, r) in [
            ("router", router.generate_once(req.clone()).await.map(|_| ())),
            ("decode", decode.generate_once(req.clone()).await.map(|_| ())),
            ("early", prefill.early_prefill(req.clone()).await.map(|_| ())),
        ] {
            let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
            assert!(allowed(code), "{name}: {req:?}: {r:?}");
        }
    }
    for (url, svc) in [
        (&dep.router, "pdserve.v1.Generation"),
        (&dep.decode[0], "pdserve.v1.Generation"),
        (&dep.prefill[0], "pdserve.v1.Prefill"),
    ] {
        assert!(pdserve::up::serving(url, svc).await, "{url} still serves");
    }
    e2e::assert_all_blocks_free(&dep.decode[0]).await;
    e2e::stop_cleanly(dep).await;
}
