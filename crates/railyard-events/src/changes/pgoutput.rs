//! Reading pgoutput's messages (protocol version 1), as the SQL function
//! `pg_logical_slot_peek_binary_changes` returns them, one message per row.

use std::collections::BTreeMap;

/// A row's columns as text (`None` for NULL; a TOASTed value that did not
/// change is left out).
pub type Row = BTreeMap<String, Option<String>>;

/// A relation as a `Relation` message describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Relation {
    pub(crate) schema: String,
    pub(crate) name: String,
    /// Column names, and whether each is part of the replica identity.
    pub(crate) columns: Vec<(String, bool)>,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    Begin {
        /// The commit record's position.
        final_lsn: u64,
        /// Microseconds since 2000-01-01.
        commit_time: i64,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
    },
    Relation(u32, Relation),
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    /// Anything else (origin, type, truncate, messages): not a row change.
    Other(u8),
}

/// A column's value in a tuple.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    /// A TOASTed value that did not change (not sent).
    Unchanged,
    Text(String),
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

type Res<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| format!("a message ended early at byte {}", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Res<i16> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn i32(&mut self) -> Res<i32> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Res<i64> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> Res<String> {
        let rest = &self.b[self.at..];
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or("a string without its terminator")?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Res<Vec<Value>> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = self.i32()?;
                    let bytes =
                        self.take(usize::try_from(len).map_err(|_| "a negative length")?)?;
                    Value::Text(String::from_utf8_lossy(bytes).into_owned())
                }
                other => return Err(format!("unknown tuple value kind {:?}", other as char)),
            });
        }
        Ok(out)
    }
}

/// Decodes one message.
// Long by design: one arm per pgoutput message.
pub(crate) fn decode(b: &[u8]) -> Res<Message> {
    let mut r = Reader { b, at: 0 };
    let kind = r.u8()?;
    Ok(match kind {
        b'B' => {
            let final_lsn = r.i64()? as u64;
            let commit_time = r.i64()?;
            let _xid = r.i32()?;
            Message::Begin {
                final_lsn,
                commit_time,
            }
        }
        b'C' => {
            let _flags = r.u8()?;
            let commit_lsn = r.i64()? as u64;
            let end_lsn = r.i64()? as u64;
            Message::Commit {
                commit_lsn,
                end_lsn,
            }
        }
        b'R' => {
            let oid = r.i32()? as u32;
            let schema = r.string()?;
            let name = r.string()?;
            let _identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::new();
            for _ in 0..n {
                let flags = r.u8()?;
                let col = r.string()?;
                let _type = r.i32()?;
                let _typmod = r.i32()?;
                columns.push((col, flags & 1 == 1));
            }
            Message::Relation(
                oid,
                Relation {
                    schema: if schema.is_empty() {
                        "pg_catalog".into()
                    } else {
                        schema
                    },
                    name,
                    columns,
                },
            )
        }
        b'I' => {
            let relation = r.i32()? as u32;
            if r.u8()? != b'N' {
                return Err("an insert without its new tuple".into());
            }
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.i32()? as u32;
            let mut tag = r.u8()?;
            let mut old = None;
            if tag == b'K' || tag == b'O' {
                old = Some(r.tuple()?);
                tag = r.u8()?;
            }
            if tag != b'N' {
                return Err("an update without its new tuple".into());
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.i32()? as u32;
            let tag = r.u8()?;
            if tag != b'K' && tag != b'O' {
                return Err("a delete without its old key".into());
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        other => Message::Other(other),
    })
}

/// A tuple as named columns (`key_only`: only the replica identity's).
pub(crate) fn row(rel: &Relation, values: &[Value], key_only: bool) -> Row {
    rel.columns
        .iter()
        .zip(values)
        .filter(|((_, key), _)| !key_only || *key)
        .filter_map(|((name, _), v)| match v {
            Value::Null => Some((name.clone(), None)),
            Value::Text(t) => Some((name.clone(), Some(t.clone()))),
            Value::Unchanged => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &mut Vec<u8>, t: &str) {
        v.extend_from_slice(t.as_bytes());
        v.push(0);
    }

    #[test]
    fn messages_decode() {
        let mut rel = vec![b'R'];
        rel.extend_from_slice(&16384i32.to_be_bytes());
        s(&mut rel, "public");
        s(&mut rel, "orders");
        rel.push(b'd');
        rel.extend_from_slice(&2i16.to_be_bytes());
        for (flag, name) in [(1u8, "id"), (0, "note")] {
            rel.push(flag);
            s(&mut rel, name);
            rel.extend_from_slice(&25i32.to_be_bytes());
            rel.extend_from_slice(&(-1i32).to_be_bytes());
        }
        let Message::Relation(oid, r) = decode(&rel).unwrap() else {
            panic!()
        };
        assert_eq!(oid, 16384);
        assert_eq!(r.columns, [("id".into(), true), ("note".into(), false)]);
        let mut ins = vec![b'I'];
        ins.extend_from_slice(&16384i32.to_be_bytes());
        ins.push(b'N');
        ins.extend_from_slice(&2i16.to_be_bytes());
        ins.push(b't');
        ins.extend_from_slice(&1i32.to_be_bytes());
        ins.push(b'7');
        ins.push(b'n');
        let Message::Insert { new, .. } = decode(&ins).unwrap() else {
            panic!()
        };
        let row = row(&r, &new, false);
        assert_eq!(row["id"].as_deref(), Some("7"));
        assert_eq!(row["note"], None);
        assert!(decode(&ins[..ins.len() - 3]).is_err());
    }
}
