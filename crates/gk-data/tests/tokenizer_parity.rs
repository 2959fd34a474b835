//! Token ids and masks equal to the Python tokenizers (transformers `CLIPTokenizerFast` on
//! OpenAI's BPE vocabulary, `BertTokenizerFast` on the bert-base-uncased vocabulary) on 26
//! tricky strings: case, punctuation, accents, digits, emoji, CJK, whitespace, over-long.
//!
//! The committed `tokenizer.json` files are small subsets of the real ones that give the
//! same ids on these strings (verified in `tools/reference/gen_fixtures.py`).

use gk_data::tokenize::TextTokenizer;
use gk_data::DataError;
use serde_json::Value;
use std::path::PathBuf;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizers")
        .join(p)
}

fn check(tok: &TextTokenizer, cases: &Value, key: &str) {
    let c = &cases[key];
    let max_len = c["max_len"].as_u64().unwrap() as usize;
    let tok = tok
        .clone()
        .with_pad_id(c["pad_id"].as_u64().unwrap() as u32);
    let mut checked = 0;
    for (i, s) in cases["strings"].as_array().unwrap().iter().enumerate() {
        let s = s.as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(c["ids"][i].clone()).unwrap();
        let want_mask: Vec<u32> = serde_json::from_value(c["mask"][i].clone()).unwrap();
        match tok.encode(s, max_len) {
            Ok(enc) => {
                assert_eq!(enc.ids, want_ids, "{key} ids for {s:?}");
                assert_eq!(enc.mask, want_mask, "{key} mask for {s:?}");
                checked += 1;
            }
            // Python happily encodes nothing as [CLS][SEP]; we refuse to ground nothing.
            Err(DataError::EmptyText) => assert_eq!(
                want_mask.iter().sum::<u32>(),
                2,
                "{key}: {s:?} is not empty"
            ),
            Err(e) => panic!("{key} {s:?}: {e}"),
        }
    }
    assert!(checked >= 24, "{key}: only {checked} strings compared");
}

#[test]
fn clip_and_bert_ids_match_python() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cases.json")).unwrap()).unwrap();
    let clip = TextTokenizer::from_file(&fixture("clip/tokenizer.json")).unwrap();
    check(&clip, &cases, "clip");
    check(&clip, &cases, "clip_short");
    let bert = TextTokenizer::from_file(&fixture("bert/tokenizer.json")).unwrap();
    check(&bert, &cases, "bert");
    check(&bert, &cases, "bert_short");
}

#[test]
fn bad_tokenizer_files_are_named_errors() {
    let e = TextTokenizer::from_file(&fixture("nope/tokenizer.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nope/tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("gk-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, "{\"not\": \"a tokenizer\"}").unwrap();
    let e = TextTokenizer::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn empty_and_overlong_expressions() {
    let bert = TextTokenizer::from_file(&fixture("bert/tokenizer.json")).unwrap();
    assert!(matches!(bert.encode("", 20), Err(DataError::EmptyText)));
    assert!(matches!(
        bert.encode(" \t\n ", 20),
        Err(DataError::EmptyText)
    ));
    let long = "the man on the left ".repeat(50);
    let enc = bert.encode(&long, 20).unwrap();
    assert!(enc.truncated);
    assert_eq!(enc.ids.len(), 20);
    assert_eq!(*enc.ids.last().unwrap(), 102); // [SEP] kept
}
