package openai

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode"
	"unicode/utf8"
)

// parse checks the body and returns the model, or an error message (and the parameter at fault)
// for a 400. Only "model" and "stream" are read; the body is otherwise only checked to be one
// valid JSON object, and passes through unchanged.
//
// It reads what encoding/json would decode into struct{Model, Stream json.RawMessage} (keys
// matched case-insensitively, the last of duplicate keys winning), without decoding the body:
// json.Valid checks it in one pass without allocating, then a walk over the top-level keys of
// the valid object finds the two values. Anything unusual (an invalid body, a key or model with
// escapes or non-ASCII bytes) is left to encoding/json, so that messages and edge cases stay its.
func parse(body []byte) (model string, stream bool, param, msg string) {
	if !json.Valid(body) {
		return parseSlow(body)
	}
	rawModel, rawStream, ok := topLevel(body)
	if !ok {
		return parseSlow(body)
	}
	return check(rawModel, rawStream)
}

// topLevel returns the raw values of the keys "model" and "stream" of a valid JSON object; ok is
// false when body is not an object or a key needs unescaping to compare.
func topLevel(b []byte) (rawModel, rawStream []byte, ok bool) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return nil, nil, false
	}
	i++
	for {
		i = skipSpace(b, i)
		switch b[i] {
		case '}':
			return rawModel, rawStream, true
		case ',':
			i = skipSpace(b, i+1)
		}
		// b[i] is the opening quote of a key.
		end, escaped := stringEnd(b, i)
		if escaped {
			return nil, nil, false
		}
		key := b[i+1 : end-1]
		i = skipSpace(b, end)
		i = skipSpace(b, i+1) // the colon
		vEnd := valueEnd(b, i)
		switch {
		case keyIs(key, "model"):
			rawModel = b[i:vEnd]
		case keyIs(key, "stream"):
			rawStream = b[i:vEnd]
		}
		i = vEnd
	}
}

// keyIs matches a key as encoding/json matches a field name: exactly, else case-folded.
func keyIs(key []byte, name string) bool {
	if string(key) == name {
		return true
	}
	return len(key) <= 4*len(name) && bytes.EqualFold(key, []byte(name))
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index just past the valid JSON string starting at b[i], and whether it
// holds an escape or a non-ASCII byte.
func stringEnd(b []byte, i int) (end int, escaped bool) {
	for j := i + 1; ; j++ {
		switch c := b[j]; {
		case c == '"':
			return j + 1, escaped
		case c == '\\':
			escaped = true
			j++ // the escaped character; \uXXXX's digits are plain bytes
		case c >= utf8.RuneSelf:
			escaped = true
		}
	}
}

// valueEnd returns the index just past the valid JSON value starting at b[i].
func valueEnd(b []byte, i int) int {
	switch b[i] {
	case '"':
		end, _ := stringEnd(b, i)
		return end
	case '{', '[':
		depth := 0
		for j := i; ; j++ {
			switch b[j] {
			case '"':
				end, _ := stringEnd(b, j)
				j = end - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return j + 1
				}
			}
		}
	default: // a number, true, false or null
		j := i
		for j < len(b) && b[j] != ',' && b[j] != '}' && b[j] != ']' && b[j] != ' ' && b[j] != '\t' && b[j] != '\n' && b[j] != '\r' {
			j++
		}
		return j
	}
}

// request is what the edge reads of a body: the rest passes through untouched.
type request struct {
	Model  json.RawMessage `json:"model"`
	Stream json.RawMessage `json:"stream"`
}

// parseSlow is parse by encoding/json: for bodies the fast walk leaves to it, and for the
// messages of invalid ones.
func parseSlow(body []byte) (model string, stream bool, param, msg string) {
	var req request
	if err := json.Unmarshal(body, &req); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return "", false, "", fmt.Sprintf("the body is not valid JSON (offset %d: %v)", se.Offset, err)
		}
		return "", false, "", "the body must be a JSON object: " + err.Error()
	}
	return check(req.Model, req.Stream)
}

// check reads the raw values of "model" and "stream" (nil: absent).
func check(rawModel, rawStream []byte) (model string, stream bool, param, msg string) {
	if len(rawModel) == 0 || string(rawModel) == "null" {
		return "", false, "model", "you must provide a model parameter"
	}
	if n := len(rawModel); n >= 2 && rawModel[0] == '"' && plainASCII(rawModel[1:n-1]) {
		model = string(rawModel[1 : n-1])
	} else if err := json.Unmarshal(rawModel, &model); err != nil {
		return "", false, "model", "model must be a string"
	}
	if model == "" {
		return "", false, "model", "you must provide a model parameter"
	}
	if !utf8.ValidString(model) || utf8.RuneCountInString(model) > 256 {
		return "", false, "model", "model must be valid UTF-8 of at most 256 characters"
	}
	for _, r := range model {
		if !unicode.IsPrint(r) {
			return "", false, "model", fmt.Sprintf("model contains the non-printable character %U", r)
		}
	}
	switch s := string(bytes.TrimSpace(rawStream)); s {
	case "", "null", "false":
	case "true":
		stream = true
	default:
		return "", false, "stream", "stream must be a boolean"
	}
	return model, stream, "", ""
}

// plainASCII: the inside of a JSON string is its value as it stands (no escape, no byte that
// encoding/json might replace).
func plainASCII(b []byte) bool {
	for _, c := range b {
		if c == '\\' || c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
