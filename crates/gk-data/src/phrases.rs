//! Phrases of an expression and the phrase -> detector-class map (weakly supervised
//! grounding, CKD).
//!
//! `chunk` is our rule-based noun-phrase chunker for data without phrase annotations:
//! the lowercased words are split at punctuation, prepositions, conjunctions, relative
//! words and copulas; trailing location words leave a run ("the circle left | of"), and
//! runs that hold no content word, or only location words ("the left"), are dropped. Each phrase is a substring of the lowercased, space-normalised text. The
//! benchmark's records carry their phrases (`extra.phrases`) and a box per phrase
//! (`extra.phrase_boxes`), which take precedence.
//!
//! `ClassMap` names a phrase's detector class by its head: the last word of the phrase
//! that equals a label name or one of its synonyms (a trailing plural `s`/`es` is
//! ignored); phrases without one have no class and get no distillation.

use crate::record::Record;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Words at which a phrase ends.
const BREAKS: &[&str] = &[
    "of",
    "to",
    "from",
    "in",
    "on",
    "at",
    "with",
    "by",
    "near",
    "beside",
    "besides",
    "behind",
    "above",
    "below",
    "under",
    "underneath",
    "over",
    "between",
    "among",
    "against",
    "into",
    "onto",
    "inside",
    "outside",
    "across",
    "along",
    "around",
    "toward",
    "towards",
    "through",
    "and",
    "or",
    "but",
    "that",
    "which",
    "who",
    "whose",
    "where",
    "while",
    "is",
    "are",
    "was",
    "were",
    "be",
    "being",
    "has",
    "have",
    "having",
    "holding",
    "wearing",
    "than",
    "as",
    "for",
    "next",
    "counting",
    "closest",
    "nearest",
];

/// Words that do not make a phrase on their own.
const FUNCTION: &[&str] = &[
    "the", "a", "an", "this", "that", "these", "those", "his", "her", "its", "their", "one",
    "some", "any", "very", "more", "most", "it", "he", "she", "they", "there", "here",
];

/// Location words: a run made of these and function words is a place, not an entity.
const LOCATION: &[&str] = &[
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "center",
    "centre",
    "front",
    "back",
    "side",
    "corner",
    "edge",
    "far",
    "leftmost",
    "rightmost",
    "topmost",
    "bottommost",
    "upper",
    "lower",
    "up",
    "down",
    "higher",
    "lower",
    "first",
    "second",
    "third",
    "fourth",
    "last",
    "picture",
    "image",
    "photo",
];

/// Our noun-phrase chunker (see the module docs).
pub fn chunk(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    // punctuation between words ends a phrase too: an empty word marks it
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace())
        .flat_map(|t| t.split_inclusive([',', ';', ':', '.', '!', '?', '(', ')']))
        .flat_map(|t| {
            let ends = t.ends_with([',', ';', ':', '.', '!', '?', '(', ')']);
            let word = t.trim_matches(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-'));
            [Some(word), ends.then_some("")].into_iter().flatten()
        })
        .collect();
    let mut out = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    let mut flush = |run: &mut Vec<&str>| {
        // "the circle left (of ...)": a trailing location word belongs to the relation
        while run.last().is_some_and(|w| LOCATION.contains(w)) && run.len() > 1 {
            run.pop();
        }
        let content = run
            .iter()
            .any(|w| !FUNCTION.contains(w) && !LOCATION.contains(w));
        if content {
            out.push(run.join(" "));
        }
        run.clear();
    };
    for w in words {
        if w.is_empty() || BREAKS.contains(&w) {
            flush(&mut run);
        } else {
            run.push(w);
        }
    }
    flush(&mut run);
    out
}

/// One phrase of a record and, when annotated, its box (pixel `xyxy`).
#[derive(Debug, Clone, PartialEq)]
pub struct Phrase {
    pub text: String,
    pub bbox: Option<[f32; 4]>,
}

/// A record's phrases: `extra.phrases` (+ `extra.phrase_boxes`) when present, else the
/// chunker's, else the whole expression. The first phrase is the head: the one the
/// expression refers to; it takes the record's box when none is annotated.
pub fn record_phrases(r: &Record) -> Vec<Phrase> {
    let given: Option<Vec<String>> = r.extra.get("phrases").and_then(|v| {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_lowercase))
                .collect()
        })
    });
    let boxes: Vec<Option<[f32; 4]>> = r
        .extra
        .get("phrase_boxes")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|b| {
                    let v: Vec<f32> = b
                        .as_array()?
                        .iter()
                        .filter_map(|x| x.as_f64().map(|x| x as f32))
                        .collect();
                    <[f32; 4]>::try_from(v).ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let texts = match given.filter(|g| !g.is_empty()) {
        Some(g) => g,
        None => {
            let c = chunk(&r.expr);
            if c.is_empty() {
                vec![r.expr.to_lowercase()]
            } else {
                c
            }
        }
    };
    texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| Phrase {
            text,
            bbox: boxes
                .get(i)
                .copied()
                .flatten()
                .or(if i == 0 { Some(r.bbox_xyxy) } else { None }),
        })
        .collect()
}

/// A detector class and the words that name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub name: String,
    /// Synonyms (the name itself always matches).
    #[serde(default)]
    pub words: Vec<String>,
}

/// The detector's classes: `labels.json` of a benchmark (`{"field": ..., "classes": [...]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labels {
    /// The object attribute in `objects.jsonl` that holds the class name.
    pub field: String,
    pub classes: Vec<Label>,
}

impl Labels {
    pub fn load(path: &Path) -> crate::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| crate::DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let labels: Self = serde_json::from_str(&text).map_err(|e| crate::DataError::Format {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        if labels.classes.is_empty() {
            return Err(crate::DataError::Format {
                path: path.to_path_buf(),
                msg: "no classes".into(),
            });
        }
        Ok(labels)
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.classes.iter().position(|c| c.name == name)
    }
}

/// Phrase -> class index (see the module docs).
#[derive(Debug, Clone)]
pub struct ClassMap {
    words: HashMap<String, usize>,
}

impl ClassMap {
    pub fn new(labels: &Labels) -> Self {
        let mut words = HashMap::new();
        for (i, c) in labels.classes.iter().enumerate() {
            for w in std::iter::once(&c.name).chain(&c.words) {
                words.entry(w.to_lowercase()).or_insert(i);
            }
        }
        Self { words }
    }

    fn word(&self, w: &str) -> Option<usize> {
        self.words.get(w).copied().or_else(|| {
            let singular = w.strip_suffix("es").filter(|s| self.words.contains_key(*s));
            singular
                .or_else(|| w.strip_suffix('s'))
                .and_then(|s| self.words.get(s).copied())
        })
    }

    /// The class of the phrase's head word, if any.
    pub fn class_of(&self, phrase: &str) -> Option<usize> {
        phrase
            .to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .rev()
            .find_map(|w| self.word(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunker_splits_at_relations_and_drops_places() {
        assert_eq!(
            chunk("The man in red on the left"),
            vec!["the man".to_string(), "red".into()]
        );
        assert_eq!(
            chunk("the circle that is left of the green star"),
            vec!["the circle".to_string(), "the green star".into()]
        );
        assert_eq!(
            chunk("a woman holding an umbrella, next to a dog"),
            vec!["a woman".to_string(), "an umbrella".into(), "a dog".into()]
        );
        assert_eq!(chunk("the one on the right"), Vec::<String>::new());
        assert_eq!(
            chunk("the small red circle left of the star"),
            vec!["the small red circle".to_string(), "the star".into()]
        );
        assert_eq!(
            chunk("a small blue disc, a big striped star and a square."),
            vec![
                "a small blue disc".to_string(),
                "a big striped star".into(),
                "a square".into()
            ]
        );
        assert_eq!(chunk(""), Vec::<String>::new());
        // every phrase is a substring of the lowercased text
        let t = "Second  Boy from the LEFT wearing a blue-shirt";
        let lower = t
            .to_lowercase()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for p in chunk(t) {
            assert!(lower.contains(&p), "{p}");
        }
    }

    fn labels() -> Labels {
        Labels {
            field: "shape".into(),
            classes: vec![
                Label {
                    name: "circle".into(),
                    words: vec!["disc".into()],
                },
                Label {
                    name: "box".into(),
                    words: vec![],
                },
                Label {
                    name: "star".into(),
                    words: vec![],
                },
            ],
        }
    }

    #[test]
    fn class_map_matches_heads_synonyms_and_plurals() {
        let m = ClassMap::new(&labels());
        assert_eq!(m.class_of("the small red disc"), Some(0));
        assert_eq!(m.class_of("two boxes"), Some(1));
        assert_eq!(m.class_of("the stars"), Some(2));
        // the head is the last matching word
        assert_eq!(m.class_of("the star-shaped circle"), Some(0));
        assert_eq!(m.class_of("the green thing"), None);
    }

    #[test]
    fn record_phrases_prefer_annotations() {
        let mut r: Record = serde_json::from_value(serde_json::json!({
            "id": "a", "dataset": "synth", "split": "train", "image": "x.png",
            "bbox_xyxy": [1.0, 2.0, 3.0, 4.0], "expr": "the star under the blue circle",
            "extra": {"phrases": ["the star", "the blue circle"],
                      "phrase_boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}
        }))
        .unwrap();
        let p = record_phrases(&r);
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].bbox, Some([5.0, 6.0, 7.0, 8.0]));
        r.extra.clear();
        let p = record_phrases(&r);
        assert_eq!(p[0].text, "the star");
        assert_eq!(p[0].bbox, Some([1.0, 2.0, 3.0, 4.0]));
        assert_eq!(p[1].bbox, None);
    }
}
