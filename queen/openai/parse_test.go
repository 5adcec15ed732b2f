package openai

import (
	"strings"
	"testing"
)

// parseCases are bodies whose reading must not depend on the fast walk: every one is read as
// encoding/json reads it into struct{Model, Stream json.RawMessage}.
var parseCases = []string{
	`{"model":"m"}`,
	` { "model" : "m" , "stream" : true } `,
	"{\n\t\"messages\": [{\"role\": \"user\", \"content\": \"a \\\"quoted\\\" } ] { word\"}],\n\t\"model\": \"tiny\",\n\t\"stream\": false\n}",
	`{"model":"a","model":"b"}`,                       // the last of duplicates wins
	`{"Model":"m"}`,                                   // keys match case-insensitively
	`{"MODEL":"m","STREAM":true}`,                     //
	`{"ſtream":true,"model":"m"}`,                     // ... with Unicode folding (U+017F folds to s)
	`{"mod\u0065l":"m"}`,                              // an escaped key
	`{"model":"caf\u00e9"}`,                           // an escaped model
	`{"model":"café"}`,                                // non-ASCII
	"{\"model\":\"a\xffb\"}",                          // invalid UTF-8, which encoding/json replaces
	`{"model":"m\u0007"}`,                             // a control character
	`{"model":""}`,                                    //
	`{"model":null}`,                                  //
	`{"model":7}`,                                     //
	`{"model":["m"]}`,                                 //
	`{"model":{"name":"m"}}`,                          //
	`{"messages":[]}`,                                 //
	`{}`,                                              //
	`{"model":"m","stream":"yes"}`,                    //
	`{"model":"m","stream":null}`,                     //
	`{"model":"m","stream":1}`,                        //
	`{"model":"m","stream":{"a":[1,{"b":"}"}]}}`,      //
	`{"x":-1.5e+3,"y":[true,false,null],"model":"m"}`, //
	`{"model":"m",`,                                   // invalid
	`{"model":"m"} x`,                                 // trailing garbage
	`{"model":"m"}{}`,                                 //
	`["m"]`,                                           // not an object
	`"m"`,                                             //
	`null`,                                            //
	``,                                                //
	`   `,                                             //
	`{"model":"` + strings.Repeat("x", 300) + `"}`, // too long
	`{"model":"a\\"}`,         // an escaped backslash at the end
	`{"a\\":"}","model":"m"}`, // a key ending in an escaped backslash
	`{"model":"m","stream":true,"model":"n","stream":false}`,
}

func TestParseReadsWhatEncodingJSONReads(t *testing.T) {
	for _, body := range parseCases {
		checkParse(t, body)
	}
}

func FuzzParse(f *testing.F) {
	for _, body := range parseCases {
		f.Add(body)
	}
	f.Fuzz(checkParse)
}

func checkParse(t *testing.T, body string) {
	m, s, p, msg := parse([]byte(body))
	wm, ws, wp, wmsg := parseSlow([]byte(body))
	if m != wm || s != ws || p != wp || msg != wmsg {
		t.Errorf("parse(%q) = %q %v %q %q; encoding/json reads %q %v %q %q", body, m, s, p, msg, wm, ws, wp, wmsg)
	}
}

// An ordinary body takes the fast walk: encoding/json's decoding allocates its values (10 times
// for this body); the walk allocates the model string (and, under the race detector, the
// scanner json.Valid's pool then drops).
func TestParseFastPathIsTaken(t *testing.T) {
	body := []byte(`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}`)
	fast := testing.AllocsPerRun(100, func() { parse(body) })
	slow := testing.AllocsPerRun(100, func() { parseSlow(body) })
	if fast > 2 || fast*4 > slow {
		t.Fatalf("parse allocates %v times a call, encoding/json %v: the fast walk is not taken", fast, slow)
	}
	if m, s, _, msg := parse(body); m != "m" || !s || msg != "" {
		t.Fatalf("parse = %q %v %q", m, s, msg)
	}
}
