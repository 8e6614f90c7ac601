//! The gateway's glob matching against answers recorded from a real Valkey 9.1
//! (`data/glob_valkey.py` wrote `data/glob_valkey.txt` with `KEYS <pattern>`).

use shoal_gateway::pubsub::glob_match;

fn strings() -> Vec<Vec<u8>> {
    let alphabet: [&[u8]; 6] = [b"a", b"b", b"]", b"-", b"\\", b"\xff"];
    let mut out: Vec<Vec<u8>> = alphabet.iter().map(|c| c.to_vec()).collect();
    for a in alphabet {
        for b in alphabet {
            out.push([a, b].concat());
        }
    }
    for a in alphabet {
        for b in alphabet {
            for c in alphabet {
                out.push([a, b, c].concat());
            }
        }
    }
    out
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn matches_like_valkey() {
    let strings = strings();
    let cases = include_str!("data/glob_valkey.txt");
    let mut checked = 0;
    for line in cases.lines() {
        let (pattern, bits) = line.split_once(' ').unwrap();
        let pattern = unhex(pattern);
        // The bitmap in hex, most significant digit first; bit i is string i.
        let digits: Vec<u8> = bits.bytes().rev().map(|d| (d as char).to_digit(16).unwrap() as u8).collect();
        for (i, s) in strings.iter().enumerate() {
            let expected = digits.get(i / 4).is_some_and(|d| d >> (i % 4) & 1 == 1);
            assert_eq!(glob_match(&pattern, s), expected, "{pattern:?} ~ {s:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 400 * strings.len());
}
