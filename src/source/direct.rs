//! Reading a datum in place. For a writer schema that is the reader schema (the usual case) the
//! record is not decoded into a generic `apache_avro::Value`: a [`Program`], compiled once per
//! writer schema, walks the datum and checks it exactly as apache-avro's decoder would accept or
//! refuse it, keeping what the features see of each top-level field (a number, or text borrowed
//! from the datum, each value read and checked once). The features then read just their fields
//! ([`Direct`] is an [`extract::Fields`]), and the scored record copies the datum's bytes.
//! Schemas this does not cover (`big-decimal`, a `duration` that is not 12 bytes, a name that
//! does not resolve) are decoded the generic way.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::schema::{
    DecimalSchema, EnumSchema, FixedSchema, InnerDecimalSchema, Name, NamespaceRef, RecordSchema,
    UuidSchema,
};
use apache_avro::types::Value;

use crate::features::extract::{Fields, Scalar};

/// The deepest nesting read (records in records, arrays of arrays). Only a recursive schema
/// can nest deeper; apache-avro would recurse until the stack ran out.
const MAX_DEPTH: u32 = 256;

/// How a node's bytes are read.
#[derive(Debug, Clone)]
enum Op {
    Null,
    Boolean,
    /// A zigzag varint in `i32` range.
    Int,
    /// A zigzag varint.
    Long,
    Float,
    Double,
    /// A length, then that many bytes.
    Bytes,
    /// A length, then that many bytes of UTF-8.
    String,
    /// A string that parses as a UUID.
    UuidString,
    /// Bytes, exactly 16 of them.
    UuidBytes,
    /// `n` bytes.
    Fixed(usize),
    /// An index into `n` symbols.
    Enum(usize),
    /// A branch index, then the branch.
    Union(Box<[usize]>),
    /// Blocks of items.
    Array(usize),
    /// Blocks of (string, value) entries.
    Map(usize),
    /// The fields, in order.
    Record(Box<[usize]>),
    /// A named type whose node is compiled (or being compiled) at this index.
    Ref(usize),
}

/// What the features see of a node's value (the generic value's variant).
#[derive(Debug, Clone)]
enum View {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Enum(Arc<[String]>),
    Uuid,
    TimestampMillis,
    TimestampMicros,
    Other(&'static str),
}

#[derive(Debug, Clone)]
struct Node {
    op: Op,
    view: View,
}

/// A compiled writer schema whose top level is a record.
#[derive(Debug)]
pub struct Program {
    nodes: Vec<Node>,
    /// The top-level fields: name and node.
    fields: Vec<(String, usize)>,
    /// How each top-level field is read, in order: most are a leaf or a union of two leaves
    /// (an optional value), read without the general walk.
    top: Box<[Top]>,
    /// The [`crate::features::extract::layout`] of the top-level fields.
    layout: u64,
}

/// How a top-level field is read.
#[derive(Debug, Clone, Copy)]
enum Top {
    /// A leaf at this node (a reference followed to its target).
    Leaf(usize),
    /// A union of two leaves (`["null", "string"]`): a branch index, then that leaf.
    Union2([usize; 2]),
    /// Anything else, the general way.
    Node(usize),
}

/// A datum read in place: what the features see of each top-level field, borrowed from its
/// bytes.
#[derive(Debug)]
pub struct Direct<'a> {
    program: Arc<Program>,
    fields: Vec<Seen<'a>>,
}

/// What the features see of a top-level field: an enum's symbol is the program's, so it is
/// kept as its index until asked for.
#[derive(Debug, Clone, Copy)]
enum Seen<'a> {
    Is(Scalar<'a>),
    Symbol { node: usize, index: usize },
}

impl Program {
    /// Compiles `schema`; `None` for one that is not a record, or that uses what this reader
    /// does not cover.
    pub fn compile(schema: &Schema) -> Option<Program> {
        let Schema::Record(RecordSchema { fields, .. }) = schema else {
            return None;
        };
        let mut c = Compiler {
            nodes: Vec::new(),
            names: HashMap::new(),
        };
        let root = c.node(schema, None)?;
        let Op::Record(ids) = &c.nodes.get(root)?.op else {
            return None;
        };
        let fields: Vec<(String, usize)> = fields
            .iter()
            .zip(ids.iter())
            .map(|(f, &id)| (f.name.clone(), id))
            .collect();
        let top = fields.iter().map(|&(_, id)| c.top(id)).collect();
        let layout = crate::features::extract::layout(fields.iter().map(|(n, _)| n.as_str()));
        Some(Program {
            nodes: c.nodes,
            fields,
            top,
            layout,
        })
    }

    /// Checks `datum` against the schema and keeps what the features see of its top-level
    /// fields; the reason when apache-avro would refuse it.
    pub fn read<'a>(self: &Arc<Self>, datum: &'a [u8]) -> Result<Direct<'a>, String> {
        let mut r = Reader { buf: datum, pos: 0 };
        let mut fields = Vec::with_capacity(self.top.len());
        for &top in self.top.iter() {
            let seen = match top {
                Top::Leaf(node) => self.leaf(node, &mut r)?,
                Top::Union2(branches) => {
                    let branch = self.branch(&branches, &mut r)?;
                    self.leaf(branch, &mut r)?
                }
                Top::Node(node) => self.field(node, &mut r, 0)?,
            };
            fields.push(seen);
        }
        if r.pos < datum.len() {
            return Err(format!(
                "{} bytes left over after the record",
                datum.len() - r.pos
            ));
        }
        Ok(Direct {
            program: self.clone(),
            fields,
        })
    }

    /// Checks a top-level field's value and gives what the features see of it: a union as its
    /// branch, a reference as its target.
    fn field<'a>(&self, node: usize, r: &mut Reader<'a>, depth: u32) -> Result<Seen<'a>, String> {
        let Some(n) = self.nodes.get(node) else {
            return Err("schema node out of range".into());
        };
        match &n.op {
            Op::Union(branches) => {
                let branch = self.branch(branches, r)?;
                self.field(branch, r, depth + 1)
            }
            Op::Ref(target) => self.field(*target, r, depth + 1),
            Op::Array(_) | Op::Map(_) | Op::Record(_) => {
                self.check(node, r, depth)?;
                Ok(Seen::Is(match n.view {
                    View::Other(name) => Scalar::Other(name),
                    _ => Scalar::Other("unreadable"),
                }))
            }
            _ => leaf(node, n, r),
        }
    }

    #[inline(always)]
    fn leaf<'a>(&self, node: usize, r: &mut Reader<'a>) -> Result<Seen<'a>, String> {
        match self.nodes.get(node) {
            Some(n) => leaf(node, n, r),
            None => Err("schema node out of range".into()),
        }
    }

    fn branch(&self, branches: &[usize], r: &mut Reader<'_>) -> Result<usize, String> {
        let i = r.long()?;
        usize::try_from(i)
            .ok()
            .and_then(|i| branches.get(i).copied())
            .ok_or_else(|| format!("union index {i} is not one of {} branches", branches.len()))
    }

    fn check(&self, node: usize, r: &mut Reader<'_>, depth: u32) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested more than {MAX_DEPTH} deep"));
        }
        let Some(n) = self.nodes.get(node) else {
            return Err("schema node out of range".into());
        };
        match &n.op {
            Op::Union(branches) => {
                let branch = self.branch(branches, r)?;
                self.check(branch, r, depth + 1)?;
            }
            Op::Array(items) => {
                self.blocks(r, size_of::<Value>(), |r| self.check(*items, r, depth + 1))?;
            }
            Op::Map(values) => {
                self.blocks(r, size_of::<(String, Value)>(), |r| {
                    r.str()?;
                    self.check(*values, r, depth + 1)
                })?;
            }
            Op::Record(fields) => {
                for &f in fields.iter() {
                    self.check(f, r, depth + 1)?;
                }
            }
            Op::Ref(target) => self.check(*target, r, depth + 1)?,
            _ => {
                leaf(node, n, r)?;
            }
        }
        Ok(())
    }

    /// An array's or map's blocks: a count (negative: followed by the block's size in bytes),
    /// its items, until a count of 0. apache-avro refuses a collection whose items, as generic
    /// values of `item_size` bytes, would need more than its allocation limit.
    fn blocks(
        &self,
        r: &mut Reader<'_>,
        item_size: usize,
        mut item: impl FnMut(&mut Reader<'_>) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut total: usize = 0;
        loop {
            let raw = r.long()?;
            let count = match raw.cmp(&0) {
                std::cmp::Ordering::Equal => return Ok(()),
                std::cmp::Ordering::Less => {
                    r.long()?;
                    raw.checked_neg().ok_or("block count overflows")?
                }
                std::cmp::Ordering::Greater => raw,
            };
            let count = usize::try_from(count).map_err(|e| e.to_string())?;
            if count > MAX_ALLOCATION {
                return Err(format!("block of {count} items is too large"));
            }
            total = total.checked_add(count).ok_or("block count overflows")?;
            let bytes = total
                .checked_mul(item_size)
                .ok_or("block count overflows")?;
            if bytes > MAX_ALLOCATION {
                return Err(format!(
                    "{total} items would need more than {MAX_ALLOCATION} bytes"
                ));
            }
            for _ in 0..count {
                item(r)?;
            }
        }
    }
}

/// Reads a node without children (neither union, collection, record nor reference), checking
/// it as apache-avro would, and gives what the features see of it.
#[inline(always)]
fn leaf<'a>(node: usize, n: &Node, r: &mut Reader<'a>) -> Result<Seen<'a>, String> {
    let raw = match &n.op {
        Op::Null => Raw::Nothing,
        Op::Boolean => match r.byte()? {
            b @ (0 | 1) => Raw::Boolean(b == 1),
            b => return Err(format!("invalid boolean byte {b}")),
        },
        Op::Int => Raw::Long(i64::from(r.int()?)),
        Op::Long => Raw::Long(r.long()?),
        Op::Float => Raw::Bytes(r.take(4)?),
        Op::Double => Raw::Bytes(r.take(8)?),
        Op::Bytes => {
            let len = r.len()?;
            Raw::Bytes(r.take(len)?)
        }
        Op::String => Raw::Str(r.str()?),
        Op::UuidString => {
            let s = r.str()?;
            Raw::Uuid(uuid::Uuid::parse_str(s).map_err(|e| format!("not a UUID: {e}"))?)
        }
        Op::UuidBytes => {
            let len = r.len()?;
            if len != 16 {
                return Err(format!("a UUID is 16 bytes, not {len}"));
            }
            Raw::Bytes(r.take(len)?)
        }
        Op::Fixed(size) => Raw::Bytes(r.take(*size)?),
        Op::Enum(symbols) => {
            let i = r.int()?;
            match usize::try_from(i) {
                Ok(i) if i < *symbols => Raw::Index(i),
                _ => return Err(format!("enum index {i} is not one of {symbols} symbols")),
            }
        }
        Op::Union(_) | Op::Array(_) | Op::Map(_) | Op::Record(_) | Op::Ref(_) => {
            return Err("not a leaf".into());
        }
    };
    let unreadable = Scalar::Other("unreadable");
    Ok(Seen::Is(match (&n.view, raw) {
        (View::Null, _) => Scalar::Null,
        (View::Boolean, Raw::Boolean(b)) => Scalar::Boolean(b),
        (View::Int, Raw::Long(l)) => i32::try_from(l).map_or(unreadable, Scalar::Int),
        (View::Long, Raw::Long(l)) => Scalar::Long(l),
        (View::TimestampMillis, Raw::Long(l)) => Scalar::TimestampMillis(l),
        (View::TimestampMicros, Raw::Long(l)) => Scalar::TimestampMicros(l),
        (View::Float, Raw::Bytes(b)) => {
            <[u8; 4]>::try_from(b).map_or(unreadable, |b| Scalar::Float(f32::from_le_bytes(b)))
        }
        (View::Double, Raw::Bytes(b)) => {
            <[u8; 8]>::try_from(b).map_or(unreadable, |b| Scalar::Double(f64::from_le_bytes(b)))
        }
        (View::String, Raw::Str(s)) => Scalar::Str(s),
        (View::Enum(_), Raw::Index(index)) => return Ok(Seen::Symbol { node, index }),
        (View::Uuid, Raw::Uuid(u)) => Scalar::Uuid(u),
        (View::Uuid, Raw::Bytes(b)) => uuid::Uuid::from_slice(b).map_or(unreadable, Scalar::Uuid),
        (View::Other(name), _) => Scalar::Other(name),
        _ => unreadable,
    }))
}

/// A leaf's value as read, before the view.
enum Raw<'a> {
    Nothing,
    Boolean(bool),
    Long(i64),
    Bytes(&'a [u8]),
    Str(&'a str),
    Uuid(uuid::Uuid),
    Index(usize),
}

/// apache-avro's default allocation limit, which it checks lengths and collection sizes against.
const MAX_ALLOCATION: usize = apache_avro::util::DEFAULT_MAX_ALLOCATION_BYTES;

impl Fields for Direct<'_> {
    fn get(&self, index: usize, name: &str) -> Option<Scalar<'_>> {
        let fields = &self.program.fields;
        let i = match fields.get(index) {
            Some((n, _)) if n == name => index,
            _ => fields.iter().position(|(n, _)| n == name)?,
        };
        self.at(i)
    }

    fn layout(&self) -> Option<u64> {
        Some(self.program.layout)
    }

    #[inline]
    fn at(&self, i: usize) -> Option<Scalar<'_>> {
        Some(match *self.fields.get(i)? {
            Seen::Is(scalar) => scalar,
            Seen::Symbol { node, index } => match self.program.nodes.get(node).map(|n| &n.view) {
                Some(View::Enum(symbols)) => symbols
                    .get(index)
                    .map_or(Scalar::Other("unreadable"), |s| Scalar::Enum(s)),
                _ => Scalar::Other("unreadable"),
            },
        })
    }
}

/// Compiles schema nodes into an arena; named types once each, by full name, so references
/// (recursive ones too) point at them.
struct Compiler {
    nodes: Vec<Node>,
    names: HashMap<Name, usize>,
}

impl Compiler {
    /// How the top-level field at `node` is read.
    fn top(&self, node: usize) -> Top {
        let leaf = |id: usize| -> Option<usize> {
            // A reference's target is a named type, never another reference.
            let id = match self.nodes.get(id)?.op {
                Op::Ref(target) => target,
                _ => id,
            };
            let is_leaf = !matches!(
                self.nodes.get(id)?.op,
                Op::Union(_) | Op::Array(_) | Op::Map(_) | Op::Record(_) | Op::Ref(_)
            );
            is_leaf.then_some(id)
        };
        if let Some(id) = leaf(node) {
            return Top::Leaf(id);
        }
        if let Some(Node {
            op: Op::Union(branches),
            ..
        }) = self.nodes.get(node)
            && let [a, b] = **branches
            && let (Some(a), Some(b)) = (leaf(a), leaf(b))
        {
            return Top::Union2([a, b]);
        }
        Top::Node(node)
    }

    fn push(&mut self, op: Op, view: View) -> usize {
        self.nodes.push(Node { op, view });
        self.nodes.len() - 1
    }

    /// Reserves a named type's node before its children are compiled.
    fn named(&mut self, name: &Name, ns: NamespaceRef<'_>) -> usize {
        let id = self.push(Op::Null, View::Null);
        self.names
            .insert(name.fully_qualified_name(ns).into_owned(), id);
        id
    }

    fn set(&mut self, id: usize, op: Op, view: View) -> Option<usize> {
        *self.nodes.get_mut(id)? = Node { op, view };
        Some(id)
    }

    fn fixed(&mut self, f: &FixedSchema, ns: NamespaceRef<'_>, view: View) -> Option<usize> {
        let id = self.named(&f.name, ns);
        self.set(id, Op::Fixed(f.size), view)
    }

    fn node(&mut self, schema: &Schema, ns: NamespaceRef<'_>) -> Option<usize> {
        Some(match schema {
            Schema::Null => self.push(Op::Null, View::Null),
            Schema::Boolean => self.push(Op::Boolean, View::Boolean),
            Schema::Int => self.push(Op::Int, View::Int),
            Schema::Date => self.push(Op::Int, View::Other("date")),
            Schema::TimeMillis => self.push(Op::Int, View::Other("time")),
            Schema::Long => self.push(Op::Long, View::Long),
            Schema::TimeMicros => self.push(Op::Long, View::Other("time")),
            Schema::TimestampMillis => self.push(Op::Long, View::TimestampMillis),
            Schema::TimestampMicros => self.push(Op::Long, View::TimestampMicros),
            Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.push(Op::Long, View::Other("another type")),
            Schema::Float => self.push(Op::Float, View::Float),
            Schema::Double => self.push(Op::Double, View::Double),
            Schema::Bytes => self.push(Op::Bytes, View::Other("bytes")),
            Schema::String => self.push(Op::String, View::String),
            Schema::Uuid(UuidSchema::String) => self.push(Op::UuidString, View::Uuid),
            Schema::Uuid(UuidSchema::Bytes) => self.push(Op::UuidBytes, View::Uuid),
            Schema::Uuid(UuidSchema::Fixed(f)) if f.size == 16 => self.fixed(f, ns, View::Uuid)?,
            Schema::Decimal(DecimalSchema { inner, .. }) => match inner {
                InnerDecimalSchema::Bytes => self.push(Op::Bytes, View::Other("decimal")),
                InnerDecimalSchema::Fixed(f) => self.fixed(f, ns, View::Other("decimal"))?,
            },
            Schema::Duration(f) if f.size == 12 => {
                self.fixed(f, ns, View::Other("another type"))?
            }
            Schema::Fixed(f) => self.fixed(f, ns, View::Other("bytes"))?,
            Schema::Enum(EnumSchema { name, symbols, .. }) => {
                let id = self.named(name, ns);
                let view = View::Enum(symbols.clone().into());
                self.set(id, Op::Enum(symbols.len()), view)?
            }
            Schema::Array(a) => {
                let items = self.node(&a.items, ns)?;
                self.push(Op::Array(items), View::Other("array"))
            }
            Schema::Map(m) => {
                let values = self.node(&m.types, ns)?;
                self.push(Op::Map(values), View::Other("map"))
            }
            Schema::Union(u) => {
                let branches = u
                    .variants()
                    .iter()
                    .map(|v| self.node(v, ns))
                    .collect::<Option<Box<[usize]>>>()?;
                self.push(Op::Union(branches), View::Other("union"))
            }
            Schema::Record(RecordSchema { name, fields, .. }) => {
                let id = self.named(name, ns);
                let full = name.fully_qualified_name(ns).into_owned();
                let inner = full.namespace();
                let ids = fields
                    .iter()
                    .map(|f| self.node(&f.schema, inner))
                    .collect::<Option<Box<[usize]>>>()?;
                self.set(id, Op::Record(ids), View::Other("record"))?
            }
            Schema::Ref { name } => {
                let target = *self.names.get(name.fully_qualified_name(ns).as_ref())?;
                // Never seen: a reference is read as its target.
                self.push(Op::Ref(target), View::Other("reference"))
            }
            // big-decimal (its bytes must parse), and sizes apache-avro refuses every datum of.
            Schema::BigDecimal | Schema::Uuid(UuidSchema::Fixed(_)) | Schema::Duration(_) => {
                return None;
            }
        })
    }
}

#[cold]
fn early() -> String {
    "the datum ends early".into()
}

/// A datum being read; reading past its end is an error (the datum ends early).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        match rest.get(..n) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(early()),
        }
    }

    #[inline(always)]
    fn byte(&mut self) -> Result<u8, String> {
        let Some(&b) = self.buf.get(self.pos) else {
            return Err(early());
        };
        self.pos += 1;
        Ok(b)
    }

    /// A zigzag varint of at most 10 bytes; bits beyond 64 are dropped, as apache-avro does.
    #[inline(always)]
    fn long(&mut self) -> Result<i64, String> {
        let mut z: u64 = 0;
        for j in 0..10 {
            let b = self.byte()?;
            z |= u64::from(b & 0x7F) << (j * 7);
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err("integer overflow".into())
    }

    #[inline(always)]
    fn int(&mut self) -> Result<i32, String> {
        let l = self.long()?;
        i32::try_from(l).map_err(|_| format!("{l} is out of range for an int"))
    }

    #[inline(always)]
    fn len(&mut self) -> Result<usize, String> {
        let l = self.long()?;
        let n = usize::try_from(l).map_err(|_| format!("negative length {l}"))?;
        if n > MAX_ALLOCATION {
            return Err(format!("length {n} is over the allocation limit"));
        }
        Ok(n)
    }

    #[inline(always)]
    fn str(&mut self) -> Result<&'a str, String> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|e| format!("invalid UTF-8: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(v: i64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            if z < 0x80 {
                out.push(z as u8);
                return out;
            }
            out.push((z as u8 & 0x7F) | 0x80);
            z >>= 7;
        }
    }

    fn theirs(bytes: &[u8]) -> Value {
        apache_avro::reader::datum::GenericDatumReader::builder(&Schema::Long)
            .build()
            .expect("reader")
            .read_value(&mut &bytes[..])
            .expect("apache-avro reads it")
    }

    #[test]
    fn varints_read_as_apache_avro_reads_them() {
        for v in [
            0,
            1,
            -1,
            63,
            -64,
            64,
            i32::MAX as i64,
            i32::MIN as i64,
            i64::MAX,
            i64::MIN,
        ] {
            let bytes = long(v);
            let mut r = Reader {
                buf: &bytes,
                pos: 0,
            };
            assert_eq!(r.long(), Ok(v));
            assert_eq!(r.pos, bytes.len());
            assert_eq!(theirs(&bytes), Value::Long(v));
        }
        let eleven = [0xFFu8; 11];
        assert!(
            Reader {
                buf: &eleven,
                pos: 0
            }
            .long()
            .is_err()
        );
        let ten = [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
        let ours = Reader { buf: &ten, pos: 0 }.long().expect("ten bytes");
        assert_eq!(theirs(&ten), Value::Long(ours));
    }

    /// A schema with every type this reader covers, recursion included.
    const EVERYTHING: &str = r#"{
      "type": "record", "name": "Everything", "namespace": "t",
      "fields": [
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "by", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "u", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
        {"name": "un", "type": ["null", "long", "string", "E"]},
        {"name": "arr", "type": {"type": "array", "items": {"type": "map", "values": "int"}}},
        {"name": "list", "type": {"type": "record", "name": "Node", "fields": [
          {"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"]}]}},
        {"name": "dec", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "date", "type": {"type": "int", "logicalType": "date"}},
        {"name": "tm", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "lts", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "fx2", "type": "Four"},
        {"name": "opt", "type": ["null", "string"]}
      ]}"#;

    fn everything(rng: &mut impl rand::Rng) -> Value {
        let node = |v: i32, next: Value| {
            Value::Record(vec![("v".into(), Value::Int(v)), ("next".into(), next)])
        };
        let mut list = Value::Union(0, Box::new(Value::Null));
        for v in 0..rng.random_range(0..4) {
            list = Value::Union(1, Box::new(node(v, list)));
        }
        let Value::Union(_, list) = list else {
            unreachable!()
        };
        let list = match *list {
            Value::Null => node(-1, Value::Union(0, Box::new(Value::Null))),
            other => other,
        };
        let un = match rng.random_range(0..4) {
            0 => Value::Union(0, Box::new(Value::Null)),
            1 => Value::Union(1, Box::new(Value::Long(rng.random()))),
            2 => Value::Union(
                2,
                Box::new(Value::String("ü".repeat(rng.random_range(0..3)))),
            ),
            _ => Value::Union(3, Box::new(Value::Enum(1, "B".into()))),
        };
        let map = |n: usize| {
            Value::Map(
                (0..n)
                    .map(|k| (format!("k{k}"), Value::Int(k as i32)))
                    .collect(),
            )
        };
        Value::Record(vec![
            ("b".into(), Value::Boolean(rng.random())),
            ("i".into(), Value::Int(rng.random())),
            ("l".into(), Value::Long(rng.random())),
            ("f".into(), Value::Float(rng.random())),
            ("d".into(), Value::Double(rng.random())),
            ("by".into(), Value::Bytes(vec![7; rng.random_range(0..5)])),
            (
                "s".into(),
                Value::String("card-".repeat(rng.random_range(0..3))),
            ),
            ("u".into(), Value::Uuid(uuid::Uuid::from_u128(rng.random()))),
            ("fx".into(), Value::Fixed(4, vec![1, 2, 3, 4])),
            ("e".into(), Value::Enum(2, "C".into())),
            ("un".into(), un),
            (
                "arr".into(),
                Value::Array(vec![map(rng.random_range(0..3)), map(1)]),
            ),
            ("list".into(), list),
            ("dec".into(), Value::Decimal(vec![0x01, 0x00].into())),
            ("date".into(), Value::Date(rng.random_range(-1000..1000))),
            ("tm".into(), Value::TimestampMicros(rng.random())),
            ("ts".into(), Value::TimestampMillis(rng.random())),
            ("lts".into(), Value::LocalTimestampMillis(rng.random())),
            ("fx2".into(), Value::Fixed(4, vec![9; 4])),
            (
                "opt".into(),
                Value::Union(1, Box::new(Value::String("x".into()))),
            ),
        ])
    }

    /// Over valid datums of every type and mutations of them, the in-place reader accepts and
    /// refuses exactly what the generic decoder does, and every top-level field reads as the
    /// features would see it in the generic value.
    #[test]
    fn reads_and_refuses_exactly_what_apache_avro_does() {
        use rand::{Rng, SeedableRng};
        let schema = Schema::parse_str(EVERYTHING).expect("schema");
        let decoder = crate::source::Decoder::with_writers(schema.clone(), [(1, schema.clone())])
            .expect("decoder");
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .expect("writer");
        let names: Vec<String> = match &schema {
            Schema::Record(r) => r.fields.iter().map(|f| f.name.clone()).collect(),
            _ => unreachable!(),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
        let (mut accepted, mut refused) = (0, 0);
        for n in 0..60_000 {
            let mut frame = Vec::new();
            crate::wire::write_header(&mut frame, 1);
            writer
                .write_value_ref(&mut frame, &everything(&mut rng))
                .expect("encodes");
            if n % 4 != 0 {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(5..frame.len());
                    match rng.random_range(0..5) {
                        0 => frame[at] ^= 1 << rng.random_range(0..8),
                        1 => frame[at] = rng.random(),
                        2 => frame.truncate(at),
                        3 => frame.insert(at, rng.random()),
                        _ => {
                            frame.remove(at);
                        }
                    }
                    if frame.len() <= 5 {
                        break;
                    }
                }
            }
            let direct = decoder.decode_known(Some(&frame));
            let generic = decoder.decode_value_known(Some(&frame));
            match (direct, generic) {
                (Ok(d), Ok((_, v))) => {
                    accepted += 1;
                    let super::super::Record::Direct(d) = d.record else {
                        panic!("not read in place")
                    };
                    for (i, name) in names.iter().enumerate() {
                        let theirs = Fields::get(&v, i, name);
                        assert_eq!(d.get(i, name), theirs, "datum {n}, field {name}");
                    }
                }
                (Err(a), Err(b)) => {
                    refused += 1;
                    assert_eq!(a.reason(), b.reason());
                }
                (a, b) => panic!(
                    "datum {n} {frame:02x?}: {:?} / {:?}",
                    a.map(|_| ()),
                    b.map(|_| ())
                ),
            }
        }
        assert!(
            accepted > 15_000 && refused > 15_000,
            "{accepted} / {refused}"
        );
    }
}
