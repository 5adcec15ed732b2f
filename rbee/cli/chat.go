package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// defaultHTTP is where `make run` serves the queen's OpenAI-compatible API.
const defaultHTTP = "http://127.0.0.1:7834"

// httpError is an answer of the queen's HTTP API that is not a success, with its exit status.
type httpError struct {
	status int
	msg    string
}

func (e httpError) Error() string { return e.msg }

// httpExits maps the HTTP API's status codes to rbee's exit statuses.
var httpExits = map[int]int{
	http.StatusBadRequest:            ExitInvalidArgument,
	http.StatusUnauthorized:          ExitUnauthenticated,
	http.StatusNotFound:              ExitNotFound,
	http.StatusRequestEntityTooLarge: ExitInvalidArgument,
	http.StatusTooManyRequests:       ExitResourceExhausted,
	http.StatusServiceUnavailable:    ExitUnavailable,
	http.StatusBadGateway:            ExitUnavailable,
	http.StatusGatewayTimeout:        ExitDeadlineExceeded,
}

func (a *app) chatCommand() *cobra.Command {
	var model, apiKeyFile, endpoint, system string
	var maxTokens int
	c := &cobra.Command{
		Use:   "chat --model MODEL PROMPT...",
		Short: "Send a prompt through the queen's OpenAI API and stream the answer",
		Long: `Send one chat message to a model through the queen's OpenAI-compatible HTTP API and print the
answer as it is generated. The queen routes it to a READY worker of the model, or starts one.

The API's address is --http (env RBEE_HTTP); its key, when the queen wants one, comes from
--api-key-file or env RBEE_API_KEY (never the cluster token).`,
		Example: `  rbee chat --model demo "Say hello"
  RBEE_API_KEY=sk-... rbee chat --http http://10.0.0.5:7834 --model llama-3-8b "What is rbee?"`,
		Args: cobra.MinimumNArgs(1),
	}
	env := os.Getenv("RBEE_HTTP")
	if env == "" {
		env = defaultHTTP
	}
	c.Flags().StringVar(&model, "model", "", "the model to ask (required; GET /v1/models lists them)")
	c.Flags().StringVar(&endpoint, "http", env, "the queen's HTTP API base URL (env RBEE_HTTP)")
	c.Flags().StringVar(&apiKeyFile, "api-key-file", "", "file holding the API key (else env RBEE_API_KEY)")
	c.Flags().StringVar(&system, "system", "", "a system message to send first")
	c.Flags().IntVar(&maxTokens, "max-tokens", 0, "most tokens to generate (0: the model's default)")
	c.RunE = a.run(func(cmd *cobra.Command, args []string) error {
		if model == "" {
			return usagef("--model is required")
		}
		key := os.Getenv("RBEE_API_KEY")
		if apiKeyFile != "" {
			b, err := os.ReadFile(apiKeyFile)
			if err != nil {
				return usagef("--api-key-file: %v", err)
			}
			key = strings.TrimSpace(string(b))
		}
		return a.chat(cmd.Context(), strings.TrimRight(endpoint, "/"), key, model, system, strings.Join(args, " "), maxTokens)
	})
	return c
}

type chatMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func (a *app) chat(ctx context.Context, base, key, model, system, prompt string, maxTokens int) error {
	req := struct {
		Model     string        `json:"model"`
		Messages  []chatMessage `json:"messages"`
		Stream    bool          `json:"stream"`
		MaxTokens int           `json:"max_tokens,omitempty"`
	}{Model: model, Stream: true, MaxTokens: maxTokens}
	if system != "" {
		req.Messages = append(req.Messages, chatMessage{"system", system})
	}
	req.Messages = append(req.Messages, chatMessage{"user", prompt})
	body, _ := json.Marshal(req)
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", bytes.NewReader(body))
	if err != nil {
		return usagef("--http %q: %v", base, err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "text/event-stream")
	if key != "" {
		hreq.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(hreq)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return httpError{http.StatusServiceUnavailable, fmt.Sprintf("cannot reach the queen's HTTP API at %s: %v", base, errors.Unwrap(err))}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return httpError{resp.StatusCode, fmt.Sprintf("%s: %s", resp.Status, apiMessage(b))}
	}
	// Server-sent events: "data: {chunk}" lines, "data: [DONE]" at the end, or an error event.
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	wrote := false
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data:")
		if !ok {
			continue
		}
		data = strings.TrimSpace(data)
		if data == "[DONE]" {
			if wrote {
				fmt.Fprintln(a.out)
			}
			return nil
		}
		var chunk struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
			} `json:"choices"`
			Error *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &chunk); err != nil {
			return fmt.Errorf("unreadable event from the queen: %q", data)
		}
		if chunk.Error != nil {
			if wrote {
				fmt.Fprintln(a.out)
			}
			return httpError{http.StatusBadGateway, "the answer broke off: " + chunk.Error.Message}
		}
		for _, ch := range chunk.Choices {
			if ch.Delta.Content != "" {
				fmt.Fprint(a.out, ch.Delta.Content)
				wrote = true
			}
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return httpError{http.StatusBadGateway, "the answer ended without [DONE]: the connection to the queen was cut"}
}

// apiMessage is the message of an OpenAI error body, or the body itself.
func apiMessage(b []byte) string {
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(b, &e) == nil && e.Error.Message != "" {
		return e.Error.Message
	}
	return strings.TrimSpace(string(b))
}
