//! Typed reads of a GGUF's metadata, each error naming the file and the key.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use crate::error::{ModelsError, Result};

pub(crate) struct Meta<'a> {
    pub path: &'a Path,
    pub map: &'a HashMap<String, Value>,
}

fn int(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

impl Meta<'_> {
    fn bad(&self, key: &str, want: &str) -> ModelsError {
        ModelsError::file(self.path, format!("metadata {key} is not {want}"))
    }

    fn missing(&self, key: &str) -> ModelsError {
        ModelsError::file(self.path, format!("metadata {key} is missing"))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => int(v)
                .and_then(|i| usize::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "a non-negative integer")),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float as the writer meant it: llama.cpp stores f32, so 1e-5 reads back as
    /// 9.99999974738e-6; its shortest decimal form gives the intended value.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(format!("{x}").parse().expect("a float's decimal form parses"))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => int(v).map(|i| Some(i as f64)).ok_or_else(|| self.bad(key, "a number")),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.bad(key, "a boolean")),
        }
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.opt_usize(key)? {
            None => Ok(None),
            Some(i) => u32::try_from(i).map(Some).map_err(|_| self.bad(key, "a token id")),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        match self.map.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(self.bad(key, "an array of strings")),
                })
                .collect(),
            Some(_) => Err(self.bad(key, "an array of strings")),
        }
    }

    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| int(v).map(|i| i as i64).ok_or_else(|| self.bad(key, "an array of integers")))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.bad(key, "an array of integers")),
        }
    }
}
