//! Flickr30k Entities in its original layout (BryanPlummer/flickr30k_entities):
//! `<split>.txt` (image ids), `Sentences/<id>.txt` (five captions whose phrases are marked
//! `[/EN#<entity>/<type>[/<type>...] words]`) and `Annotations/<id>.xml` (the image size and
//! objects: one or more `<name>` entity ids with a `<bndbox>`, or `<nobndbox>`/`<scene>`).
//!
//! The semantics are those of the dataset's `flickr30k_entities_utils.py`:
//! `get_sentence_data` (whitespace tokens; a phrase runs from a `[/EN#...` token to the token
//! ending in `]`; the caption is the words without the marks) and `get_annotations` (box
//! coordinates minus 1). One canonical record per caption with at least one phrase that has
//! a box: `expr` the caption, `extra.phrases` its boxed phrases in order,
//! `extra.phrase_boxes` for each the union of its entity's boxes (the merged-box protocol;
//! `extra.phrase_all_boxes` keeps them all), `extra.phrase_types`, `extra.phrase_entities`;
//! the record's box is its first phrase's. Phrases of entity 0 (not visual) or without a box
//! are dropped, as the phrase localisation benchmark does. Images are
//! `flickr30k/images/<id>.jpg`. The XML is read by a small tag scanner that understands
//! exactly these elements; anything malformed is an error naming the file.

use crate::error::{DataError, Result};
use crate::published::{Converted, SourceFile};
use crate::record::Record;
use std::collections::BTreeMap;
use std::path::Path;

/// One marked phrase of a caption.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkedPhrase {
    pub text: String,
    pub entity: String,
    pub types: Vec<String>,
    pub first_word: usize,
}

/// One caption: its words and marked phrases.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    pub phrases: Vec<MarkedPhrase>,
}

/// `get_sentence_data` of one `Sentences/<id>.txt` (an unterminated phrase is an error).
pub fn parse_sentences(text: &str, path: &Path) -> Result<Vec<Caption>> {
    let mut out = Vec::new();
    for (line, sentence) in text.lines().enumerate() {
        if sentence.trim().is_empty() {
            continue;
        }
        let (mut words, mut phrases) = (Vec::new(), Vec::new());
        let mut current: Option<(MarkedPhrase, Vec<String>)> = None;
        for token in sentence.split_whitespace() {
            if let Some((p, mut ws)) = current.take() {
                let (word, ends) = match token.strip_suffix(']') {
                    Some(w) => (w, true),
                    None => (token, false),
                };
                ws.push(word.to_string());
                words.push(word.to_string());
                if ends {
                    phrases.push(MarkedPhrase {
                        text: ws.join(" "),
                        ..p
                    });
                } else {
                    current = Some((p, ws));
                }
            } else if let Some(mark) = token.strip_prefix('[') {
                let parts: Vec<&str> = mark.split('/').collect();
                let entity = parts
                    .get(1)
                    .and_then(|e| e.strip_prefix("EN#"))
                    .ok_or_else(|| DataError::Annotation {
                        path: path.to_path_buf(),
                        line: line + 1,
                        msg: format!("phrase mark `{token}` is not `[/EN#<id>/<type>`"),
                    })?;
                current = Some((
                    MarkedPhrase {
                        text: String::new(),
                        entity: entity.to_string(),
                        types: parts[2..].iter().map(|t| t.to_string()).collect(),
                        first_word: words.len(),
                    },
                    Vec::new(),
                ));
            } else {
                words.push(token.to_string());
            }
        }
        if current.is_some() {
            return Err(DataError::Annotation {
                path: path.to_path_buf(),
                line: line + 1,
                msg: "a phrase is not closed with `]`".into(),
            });
        }
        out.push(Caption {
            text: words.join(" "),
            phrases,
        });
    }
    Ok(out)
}

/// What `get_annotations` returns for one image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Annotation {
    pub width: u32,
    pub height: u32,
    /// Entity id -> its boxes (`xmin - 1, ymin - 1, xmax - 1, ymax - 1`).
    pub boxes: BTreeMap<String, Vec<[f64; 4]>>,
    pub scene: Vec<String>,
    pub nobox: Vec<String>,
}

/// Inner texts of every `<tag>...</tag>` in `s` (attributes allowed, not nested).
fn elements<'a>(s: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        // `<tag>` or `<tag attr=...>`, not `<tagother>`
        if !after.starts_with(['>', ' ', '\t', '\n', '\r']) {
            rest = after;
            continue;
        }
        let Some(gt) = after.find('>') else { break };
        let body = &after[gt + 1..];
        let Some(end) = body.find(&close) else { break };
        out.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    out
}

/// `get_annotations` of one `Annotations/<id>.xml`.
pub fn parse_annotation(xml: &str, path: &Path) -> Result<Annotation> {
    let err = |msg: String| DataError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let number = |s: &str, what: &str| -> Result<i64> {
        s.trim()
            .parse::<i64>()
            .map_err(|_| err(format!("{what} `{}` is not an integer", s.trim())))
    };
    let one = |s: &'_ str, tag: &str| -> Result<i64> {
        let v = elements(s, tag);
        let first = v.first().ok_or_else(|| err(format!("no <{tag}>")))?;
        number(first, tag)
    };
    let size = *elements(xml, "size")
        .first()
        .ok_or_else(|| err("no <size>: not a Flickr30k Entities annotation".into()))?;
    let (w, h) = (one(size, "width")?, one(size, "height")?);
    if w <= 0 || h <= 0 || w > i64::from(u32::MAX) || h > i64::from(u32::MAX) {
        return Err(err(format!("image size {w}x{h}")));
    }
    let mut a = Annotation {
        width: w as u32,
        height: h as u32,
        ..Annotation::default()
    };
    for obj in elements(xml, "object") {
        let names = elements(obj, "name");
        if names.is_empty() {
            return Err(err("an <object> without <name>".into()));
        }
        match elements(obj, "bndbox").first() {
            Some(b) => {
                let v = [
                    one(b, "xmin")?,
                    one(b, "ymin")?,
                    one(b, "xmax")?,
                    one(b, "ymax")?,
                ]
                .map(|x| (x - 1) as f64);
                for n in &names {
                    a.boxes.entry(n.trim().to_string()).or_default().push(v);
                }
            }
            None => {
                for n in &names {
                    if one(obj, "nobndbox")? > 0 {
                        a.nobox.push(n.trim().to_string());
                    }
                    if one(obj, "scene")? > 0 {
                        a.scene.push(n.trim().to_string());
                    }
                }
            }
        }
    }
    Ok(a)
}

fn union(boxes: &[[f64; 4]]) -> [f64; 4] {
    boxes
        .iter()
        .fold([f64::MAX, f64::MAX, f64::MIN, f64::MIN], |u, b| {
            [
                u[0].min(b[0]),
                u[1].min(b[1]),
                u[2].max(b[2]),
                u[3].max(b[3]),
            ]
        })
}

/// The records of one image (see the module docs); `split` names them.
pub fn image_records(split: &str, id: &str, captions: &[Caption], ann: &Annotation) -> Vec<Record> {
    let mut out = Vec::new();
    for (k, c) in captions.iter().enumerate() {
        let boxed: Vec<&MarkedPhrase> = c
            .phrases
            .iter()
            .filter(|p| p.entity != "0" && ann.boxes.contains_key(&p.entity))
            .collect();
        let Some(first) = boxed.first() else { continue };
        let merged = |p: &MarkedPhrase| union(&ann.boxes[&p.entity]);
        let mut extra = serde_json::Map::new();
        extra.insert(
            "phrases".into(),
            boxed.iter().map(|p| p.text.clone()).collect(),
        );
        extra.insert(
            "phrase_boxes".into(),
            serde_json::json!(boxed.iter().map(|p| merged(p)).collect::<Vec<_>>()),
        );
        extra.insert(
            "phrase_all_boxes".into(),
            serde_json::json!(boxed
                .iter()
                .map(|p| &ann.boxes[&p.entity])
                .collect::<Vec<_>>()),
        );
        extra.insert(
            "phrase_types".into(),
            serde_json::json!(boxed.iter().map(|p| &p.types).collect::<Vec<_>>()),
        );
        extra.insert(
            "phrase_entities".into(),
            serde_json::json!(boxed.iter().map(|p| &p.entity).collect::<Vec<_>>()),
        );
        out.push(Record {
            id: format!("flickr30k_entities/{split}/{id}/{k}"),
            dataset: "flickr30k_entities".into(),
            split_by: None,
            split: split.into(),
            image: format!("flickr30k/images/{id}.jpg"),
            width: Some(ann.width),
            height: Some(ann.height),
            bbox_xyxy: merged(first).map(|v| v as f32),
            bbox_src: "xyxy".into(),
            expr: c.text.clone(),
            extra,
        });
    }
    out
}

fn read_file(path: &Path, sources: &mut Vec<SourceFile>) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sources.push(SourceFile::of(path, &bytes));
    String::from_utf8(bytes).map_err(|_| DataError::Format {
        path: path.to_path_buf(),
        msg: "not UTF-8 text".into(),
    })
}

/// Reads split `split` (`train`, `val`, `test`) of a `flickr30k_entities` folder. With
/// `skip_bad`, an image whose files are missing or malformed is skipped and counted.
pub fn read(dir: &Path, split: &str, skip_bad: bool) -> Result<Converted> {
    let mut conv = Converted::default();
    let list = dir.join(format!("{split}.txt"));
    let ids = read_file(&list, &mut conv.sources)?;
    for (row, id) in ids
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let mut sources = Vec::new();
        let one = (|| -> Result<Vec<Record>> {
            let sp = dir.join("Sentences").join(format!("{id}.txt"));
            let ap = dir.join("Annotations").join(format!("{id}.xml"));
            let captions = parse_sentences(&read_file(&sp, &mut sources)?, &sp)?;
            let ann = parse_annotation(&read_file(&ap, &mut sources)?, &ap)?;
            Ok(image_records(split, id, &captions, &ann))
        })();
        match one {
            Ok(r) => {
                conv.records.extend(r);
                conv.sources.extend(sources);
            }
            Err(e) if skip_bad => conv.skipped.push(crate::dataset::Skipped {
                line: row + 1,
                reason: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(conv)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENTENCES: &str = "\
[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing up [/EN#20/other a set of stairs] in [/EN#21/scene an entry way] .
[/EN#18/people A little girl] in [/EN#19/clothing pink] climbs [/EN#20/other the stairs] .
[/EN#0/notvisual It] is sunny .
";

    const XML: &str = "<annotation>
<filename>1000092795.jpg</filename>
<size><width>500</width><height>375</height><depth>3</depth></size>
<object><name>18</name><bndbox><xmin>100</xmin><ymin>50</ymin><xmax>200</xmax><ymax>300</ymax></bndbox></object>
<object><name>19</name><name>18</name><bndbox><xmin>120</xmin><ymin>150</ymin><xmax>190</xmax><ymax>330</ymax></bndbox></object>
<object><name>20</name><bndbox><xmin>1</xmin><ymin>200</ymin><xmax>260</xmax><ymax>375</ymax></bndbox></object>
<object><name>21</name><nobndbox>0</nobndbox><scene>1</scene></object>
</annotation>";

    #[test]
    fn sentences_and_annotations_read_as_the_official_utils() {
        let p = Path::new("x.txt");
        let c = parse_sentences(SENTENCES, p).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0].text,
            "A child in a pink dress is climbing up a set of stairs in an entry way ."
        );
        assert_eq!(c[0].phrases.len(), 4);
        assert_eq!(c[0].phrases[2].text, "a set of stairs");
        assert_eq!(c[0].phrases[2].first_word, 9);
        assert_eq!(c[0].phrases[0].types, vec!["people".to_string()]);
        let a = parse_annotation(XML, Path::new("x.xml")).unwrap();
        assert_eq!((a.width, a.height), (500, 375));
        // minus 1, entity 18 has two boxes, 21 is scene
        assert_eq!(
            a.boxes["18"],
            vec![[99.0, 49.0, 199.0, 299.0], [119.0, 149.0, 189.0, 329.0]]
        );
        assert_eq!(a.boxes["20"], vec![[0.0, 199.0, 259.0, 374.0]]);
        assert_eq!(a.scene, vec!["21".to_string()]);
        let r = image_records("test", "1000092795", &c, &a);
        // the third caption has no boxed phrase
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].image, "flickr30k/images/1000092795.jpg");
        assert_eq!(r[0].bbox_xyxy, [99.0, 49.0, 199.0, 329.0]); // union of 18's boxes
        assert_eq!(
            r[0].extra["phrases"],
            serde_json::json!(["A child", "a pink dress", "a set of stairs"])
        );
        let rec_phrases = crate::phrases::record_phrases(&r[1]);
        assert_eq!(rec_phrases[2].bbox, Some([0.0, 199.0, 259.0, 374.0]));
        for rec in &r {
            crate::dataset::check_record(rec, Path::new("."), false).unwrap();
        }
    }

    #[test]
    fn malformed_files_are_named_errors() {
        let e = parse_sentences("[/EN#1/people a dog is here .\n", Path::new("s/1.txt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("s/1.txt:1") && e.contains("not closed"), "{e}");
        let e = parse_sentences("[/XX#1/people a] dog\n", Path::new("s/2.txt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("EN#"), "{e}");
        for (xml, needle) in [
            ("<annotation></annotation>", "no <size>"),
            ("<size><width>5</width></size>", "no <height>"),
            ("<size><width>x</width><height>3</height></size>", "not an integer"),
            ("<size><width>5</width><height>3</height></size><object><bndbox></bndbox></object>", "without <name>"),
            ("<size><width>5</width><height>3</height></size><object><name>1</name><bndbox><xmin>1</xmin></bndbox></object>", "no <ymin>"),
        ] {
            let e = parse_annotation(xml, Path::new("a/1.xml")).unwrap_err().to_string();
            assert!(e.contains("a/1.xml") && e.contains(needle), "{xml}: {e}");
        }
    }

    #[test]
    fn a_split_folder_converts_and_bad_images_can_be_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("Sentences")).unwrap();
        std::fs::create_dir_all(d.join("Annotations")).unwrap();
        std::fs::write(d.join("test.txt"), "1000092795\n2\n").unwrap();
        std::fs::write(d.join("Sentences/1000092795.txt"), SENTENCES).unwrap();
        std::fs::write(d.join("Annotations/1000092795.xml"), XML).unwrap();
        std::fs::write(d.join("Sentences/2.txt"), SENTENCES).unwrap();
        std::fs::write(d.join("Annotations/2.xml"), "<annotation/>").unwrap();
        let e = read(d, "test", false).unwrap_err().to_string();
        assert!(e.contains("2.xml"), "{e}");
        let c = read(d, "test", true).unwrap();
        assert_eq!(c.records.len(), 2);
        assert_eq!(c.skipped.len(), 1);
        assert_eq!(c.sources.len(), 3); // the list and one image's two files
    }
}
