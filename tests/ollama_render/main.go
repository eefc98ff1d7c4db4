// Command ollama_render executes an Ollama Modelfile TEMPLATE the way ollama does, without ollama
// (tests/test_ollama.py builds and runs it; ollama itself cannot be installed where the tests run).
//
// Standard library only, Go >= 1.19. It mirrors, function by function, ollama's template package
// (github.com/ollama/ollama, commit fb30760996871fa9460115c753afd2c60d4ab0f7, after v0.33.0-rc2;
// template/template.go is the same from v0.13.5 on) and what the /api/chat handler does before
// the rendered prompt reaches the tokenizer:
//
//   - server/routes.go ChatHandler (routes.go:2656-2659): the Modelfile SYSTEM (-system) is
//     prepended as a {"role": "system"} message when the request's first message is not one.
//   - template/template.go Parse (template.go:145-165): text/template with
//     Option("missingkey=zero") and the same FuncMap (template.go:120-143); a template that names
//     neither "messages" nor "response" gets a trailing {{ .Response }} node.
//   - template/template.go Vars and Identifiers (template.go:171-189, 516-582).
//   - template/template.go Execute (template.go:257-350): collate (template.go:357-374) merges
//     consecutive messages of the same role with "\n\n" (not "tool") and joins every system
//     message into .System; system messages stay in .Messages. A template that names "messages"
//     is executed once with System, Messages, Tools, Response "", Think, ThinkLevel, IsThinkSet;
//     otherwise the legacy .System/.Prompt/.Response loop runs, the last execution cut before
//     {{ .Response }} by deleteNode (template.go:586-651).
//
// Not mirrored, because a chat without them never reaches them: the Suffix (fill-in-the-middle)
// path, tools, images, thinking, and the truncation of old messages past num_ctx
// (server/prompt.go).
//
// Usage:
//
//	ollama_render -template TEMPLATE_FILE [-system "Modelfile SYSTEM"] < dialogs.json
//
// stdin: a JSON list of dialogs, each a list of {"role": ..., "content": ...}.
// stdout: a JSON list with, per dialog, the rendered string, or {"error": "..."} when executing
// the template fails (ollama answers such a request with that error). A template that does not
// parse (ollama create refuses it) exits with status 1.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// Message mirrors the fields of ollama's templateMessage that a template can see
// (template.go:448-456).
type Message struct {
	Role       string `json:"role"`
	Content    string `json:"content"`
	Thinking   string `json:"thinking,omitempty"`
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

// funcs: template.go:120-143 (toTypeScriptType only knows api.ToolProperty, which never occurs
// here, so it answers "any" as ollama does for any other value).
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		return "any"
	},
}

// response: template.go:102-118.
var response = parse.ActionNode{
	NodeType: parse.NodeAction,
	Pipe: &parse.PipeNode{
		NodeType: parse.NodePipe,
		Cmds: []*parse.CommandNode{{
			NodeType: parse.NodeCommand,
			Args:     []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}},
		}},
	},
}

type Template struct {
	*template.Template
	raw string
}

// Parse: template.go:145-165.
func Parse(s string) (*Template, error) {
	tmpl := template.New("").Option("missingkey=zero").Funcs(funcs)
	tmpl, err := tmpl.Parse(s)
	if err != nil {
		return nil, err
	}
	t := Template{Template: tmpl, raw: s}
	vars, err := t.Vars()
	if err != nil {
		return nil, err
	}
	if !contains(vars, "messages") && !contains(vars, "response") {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &response)
	}
	return &t, nil
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

// Vars: template.go:171-189.
func (t *Template) Vars() ([]string, error) {
	var vars []string
	for _, tt := range t.Templates() {
		for _, n := range tt.Root.Nodes {
			v, err := Identifiers(n)
			if err != nil {
				return vars, err
			}
			vars = append(vars, v...)
		}
	}
	set := map[string]struct{}{}
	for _, n := range vars {
		set[strings.ToLower(n)] = struct{}{}
	}
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, nil
}

// Identifiers: template.go:516-582.
func Identifiers(n parse.Node) ([]string, error) {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, n := range n.Nodes {
			i, err := Identifiers(n)
			if err != nil {
				return names, err
			}
			names = append(names, i...)
		}
		return names, nil
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined template specified")
		}
		return Identifiers(n.Pipe)
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined action in template")
		}
		return Identifiers(n.Pipe)
	case *parse.BranchNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined branch")
		}
		names, err := Identifiers(n.Pipe)
		if err != nil {
			return names, err
		}
		for _, n := range []*parse.ListNode{n.List, n.ElseList} {
			if n != nil {
				i, err := Identifiers(n)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.IfNode:
		return Identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return Identifiers(&n.BranchNode)
	case *parse.WithNode:
		return Identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				i, err := Identifiers(a)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return nil, nil
}

// collate: template.go:357-374.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// Execute: template.go:257-350 (no Suffix, no Think, no Tools here).
func (t *Template) Execute(w io.Writer, msgs []Message) error {
	system, messages := collate(msgs)
	vars, err := t.Vars()
	if err != nil {
		return err
	}
	if contains(vars, "messages") {
		var tools []any // nil, as convertToolsForTemplate(nil)
		return t.Template.Execute(w, map[string]any{
			"System":     system,
			"Messages":   messages,
			"Tools":      tools,
			"Response":   "",
			"Think":      false,
			"ThinkLevel": "",
			"IsThinkSet": false,
		})
	}

	system = ""
	var b bytes.Buffer
	var prompt, resp string
	for _, m := range messages {
		execute := func() error {
			if err := t.Template.Execute(&b, map[string]any{
				"System": system, "Prompt": prompt, "Response": resp,
				"Think": false, "ThinkLevel": "", "IsThinkSet": false,
			}); err != nil {
				return err
			}
			system, prompt, resp = "", "", ""
			return nil
		}
		switch m.Role {
		case "system":
			if prompt != "" || resp != "" {
				if err := execute(); err != nil {
					return err
				}
			}
			system = m.Content
		case "user":
			if resp != "" {
				if err := execute(); err != nil {
					return err
				}
			}
			prompt = m.Content
		case "assistant":
			resp = m.Content
		}
	}

	var cut bool
	nodes := deleteNode(t.Template.Root.Copy(), func(n parse.Node) bool {
		if field, ok := n.(*parse.FieldNode); ok && contains(field.Ident, "Response") {
			cut = true
			return false
		}
		return cut
	})
	tree := parse.Tree{Root: nodes.(*parse.ListNode)}
	if err := template.Must(template.New("").AddParseTree("", &tree)).Execute(&b, map[string]any{
		"System": system, "Prompt": prompt, "Response": resp,
		"Think": false, "ThinkLevel": "", "IsThinkSet": false,
	}); err != nil {
		return err
	}
	_, err = io.Copy(w, &b)
	return err
}

// deleteNode: template.go:586-651.
func deleteNode(n parse.Node, fn func(parse.Node) bool) parse.Node {
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if fn(n) {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			var nodes []parse.Node
			for _, c := range t.Nodes {
				if n := walk(c); n != nil {
					nodes = append(nodes, n)
				}
			}
			t.Nodes = nodes
			return t
		case *parse.IfNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.WithNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.RangeNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.BranchNode:
			t.List = walk(t.List).(*parse.ListNode)
			if t.ElseList != nil {
				t.ElseList = walk(t.ElseList).(*parse.ListNode)
			}
		case *parse.ActionNode:
			n := walk(t.Pipe)
			if n == nil {
				return nil
			}
			t.Pipe = n.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if n := walk(a); n != nil {
						args = append(args, n)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				commands = append(commands, c)
			}
			if len(commands) == 0 {
				return nil
			}
			t.Cmds = commands
		}
		return n
	}
	return walk(n)
}

func main() {
	tmplPath := flag.String("template", "", "file holding the Modelfile TEMPLATE text")
	modelSystem := flag.String("system", "", "Modelfile SYSTEM, prepended as ollama's ChatHandler does")
	flag.Parse()
	if *tmplPath == "" {
		fmt.Fprintln(os.Stderr, "usage: ollama_render -template FILE [-system TEXT] < dialogs.json")
		os.Exit(2)
	}
	raw, err := os.ReadFile(*tmplPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var dialogs [][]Message
	if err := json.NewDecoder(os.Stdin).Decode(&dialogs); err != nil {
		fmt.Fprintln(os.Stderr, "stdin:", err)
		os.Exit(1)
	}
	out := make([]any, 0, len(dialogs))
	for _, d := range dialogs {
		// ollama parses the template once per model; parse per dialog so that the legacy path's
		// in-place edits can never leak between dialogs.
		t, err := Parse(string(raw))
		if err != nil {
			fmt.Fprintln(os.Stderr, "template:", err)
			os.Exit(1)
		}
		msgs := d
		if *modelSystem != "" && (len(d) == 0 || d[0].Role != "system") {
			msgs = append([]Message{{Role: "system", Content: *modelSystem}}, d...)
		}
		var b bytes.Buffer
		if err := t.Execute(&b, msgs); err != nil {
			out = append(out, map[string]string{"error": err.Error()})
			continue
		}
		out = append(out, b.String())
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
