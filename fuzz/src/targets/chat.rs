//! Chat template input: API callers choose the messages, model files the template. Input:
//! a mode byte, then NUL-separated fields. Even modes render a fixed template (one of a few
//! written in the styles real models use) over the input's `(role, content)` pairs; odd modes
//! take the template itself from the input too. Rendering is bounded by fuel and by
//! [`max_rendered_bytes`], so the limit is linear in the input.

use mdi_core::tokenizer::{max_rendered_bytes, render_chat};

use super::model::CHAT_TEMPLATE;
use crate::engine::{label, Run, Target};
use crate::meter;

/// Templates in the styles models ship: ChatML, a system prompt folded into the first turn
/// with an exception for bad roles, and one with loop variables and filters.
const TEMPLATES: [&str; 3] = [
    CHAT_TEMPLATE,
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% if m['role'] == 'user' %}[INST] {% if loop.first and sys %}{{ sys }}\n\n{% endif %}{{ m['content'].strip() }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}",
    "{%- for m in messages -%}{{ loop.index }}:{{ m.role | upper }}={{ m.content | replace('\\n', ' ') | truncate(200) }}{% if not loop.last %};{% endif %}{%- endfor -%}{{ '|' ~ (messages | length) }}",
];

pub struct ChatTarget;

impl Target for ChatTarget {
    fn name(&self) -> &'static str {
        "chat"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        for mode in 0..TEMPLATES.len() as u8 {
            seeds.push(
                [
                    &[mode * 2][..],
                    b"system\0Be brief.\0user\0  Hello there  \0assistant\0Hi!\0user\0And you?",
                ]
                .concat(),
            );
            let mut own = vec![mode * 2 + 1];
            own.extend(TEMPLATES[mode as usize].as_bytes());
            own.extend(b"\0user\0What is 2+2?");
            seeds.push(own);
        }
        seeds
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"\0user\0",
            b"\0assistant\0",
            b"\0system\0",
            b"{{ ",
            b" }}",
            b"{% for m in messages %}",
            b"{% endfor %}",
            b"{% if ",
            b"{% endif %}",
            b"{% set x = ",
            b"range(100000)",
            b"messages * 1000",
            b"m.content ~ m.content",
            b"loop.index",
            b"raise_exception('x')",
            b"| join(',')",
            b"<|im_start|>",
            b"{{ bos_token }}",
            b"{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
            b"\xff\xfe",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Run {
        let (mode, rest) = data.split_first().map_or((0, &[][..]), |(m, r)| (*m, r));
        let text = String::from_utf8_lossy(rest).into_owned();
        let mut fields = text.split('\0');
        let template = if mode % 2 == 1 {
            fields.next().unwrap_or_default().to_string()
        } else {
            TEMPLATES[(mode as usize / 2) % TEMPLATES.len()].to_string()
        };
        let rest: Vec<&str> = fields.collect();
        let messages: Vec<(&str, &str)> = rest
            .chunks(2)
            .map(|p| (p[0], p.get(1).copied().unwrap_or("")))
            .collect();
        // Rendering may hold its output, the template's compiled form and the values it makes;
        // all of them bounded by fuel and the output cap, which grow with the input.
        let limit = (4 << 20) + 64 * max_rendered_bytes(&template, &messages) as u64;
        meter::reset();
        let (what, depth) = match render_chat(&template, &messages, Some("<s>")) {
            Ok(out) => {
                assert!(out.len() <= max_rendered_bytes(&template, &messages));
                (format!("ok {}", out.len().min(1)), 3)
            }
            Err(e) => {
                let e = e.to_string();
                let depth = if e.contains("syntax error") { 1 } else { 2 };
                (e, depth)
            }
        };
        Run {
            behaviour: label(&what) ^ (mode as u64 & 1),
            limit,
            depth,
        }
    }
}
