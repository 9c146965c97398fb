// Reference (d), the Go anchor: Centrifuge v0.15 (Debian's golang-github-centrifugal-centrifuge-dev)
// with its in-memory broker, built by bench/run.py in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o bench/results/bin/centrifuge-server bench/servers/centrifuge_server.go
//
// It speaks Centrifuge's own JSON protocol, not Baserow's (bench/wsclient.py has a mode for it):
//
//   - GET /connection/websocket?jwt_token=<JWT>: the same HS256 check as the Python servers
//     (exp required, token_type "access" when present, integer user_id; refused with HTTP 403
//     before the upgrade); the client then sends {"id":1} (connect) and gets {"id":1,"result":{...}};
//   - {"id":K,"method":1,"params":{"channel":"table-N"}} subscribes when the user may view table N
//     (tables 1..--tables in workspace 1, members 1..--users: the same rule as common.Directory);
//   - publications arrive as {"result":{"channel":"table-N","data":{"data":<message>}}}, up to 4 per
//     WebSocket frame, newline-separated (Centrifuge's writer packs what is queued).
//
// and the benchmark's two publish paths, identical in what they publish to the Python servers:
//
//   - GET /bench/publish (WebSocket): trigger frames {"seq":S,"rounds":R,"t0":T,"n":N[,"ts":TS]}
//     (servers/common.py); each message is the byte-identical rows_updated JSON, node.Publish'ed
//     to channel "table-<id>";
//   - POST /api/publish: the body of tornado-rt's HTTP API (an envelope or an array of envelopes
//     {"message": {...}}), parsed with encoding/json; each message's bytes (json.RawMessage, as
//     given) are node.Publish'ed to "table-<message.table_id>"; answers {"published":N}.
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/gorilla/websocket"
)

const secret = "tornado-rt-bench-secret-0123456789abcdef" // servers/common.py SECRET

var users, tables int

// userFromToken is common.decode_token: HS256, exp required and in the future, token_type
// "access" when present, integer user_id.
func userFromToken(token string) (int, bool) {
	if token == "" || len(token) > 8192 {
		return 0, false
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return 0, false
	}
	header, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		return 0, false
	}
	var h struct {
		Alg string `json:"alg"`
	}
	if json.Unmarshal(header, &h) != nil || h.Alg != "HS256" {
		return 0, false
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(parts[0] + "." + parts[1]))
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || !hmac.Equal(sig, mac.Sum(nil)) {
		return 0, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return 0, false
	}
	var claims struct {
		UserID    *json.Number `json:"user_id"`
		Exp       *json.Number `json:"exp"`
		TokenType *string      `json:"token_type"`
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	if dec.Decode(&claims) != nil || claims.Exp == nil || claims.UserID == nil {
		return 0, false
	}
	exp, err := claims.Exp.Float64()
	if err != nil || float64(time.Now().Unix()) >= exp {
		return 0, false
	}
	if claims.TokenType != nil && *claims.TokenType != "access" {
		return 0, false
	}
	uid, err := claims.UserID.Int64()
	if err != nil {
		return 0, false
	}
	return int(uid), true
}

func canViewTable(userID int, channel string) bool {
	if !strings.HasPrefix(channel, "table-") {
		return false
	}
	t, err := strconv.Atoi(channel[6:])
	return err == nil && t >= 1 && t <= tables && userID >= 1 && userID <= users
}

func auth(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uid, ok := userFromToken(r.URL.Query().Get("jwt_token"))
		if !ok {
			http.Error(w, "authentication failed", http.StatusForbidden)
			return
		}
		ctx := centrifuge.SetCredentials(r.Context(), &centrifuge.Credentials{UserID: strconv.Itoa(uid)})
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

// rowsUpdated is common.dumps(common.rows_updated(table, seq, ts)), byte for byte.
func rowsUpdated(buf []byte, table int, seq int64, ts int64) []byte {
	buf = append(buf[:0], `{"type":"rows_updated","seq":`...)
	buf = strconv.AppendInt(buf, seq, 10)
	buf = append(buf, `,"ts":`...)
	buf = strconv.AppendInt(buf, ts, 10)
	buf = append(buf, `,"table_id":`...)
	buf = strconv.AppendInt(buf, int64(table), 10)
	buf = append(buf, `,"rows_before_update":[{"id":1042,"order":"1042.00000000000000000000","field_5521":"Acme Corp","field_5522":"Open"}],"rows":[{"id":1042,"order":"1042.00000000000000000000","field_5521":"Acme Corp","field_5522":"Won"}],"metadata":{},"updated_field_ids":[5522]}`...)
	return buf
}

type trigger struct {
	Seq    int64  `json:"seq"`
	Rounds int    `json:"rounds"`
	T0     int    `json:"t0"`
	N      int    `json:"n"`
	Ts     *int64 `json:"ts"`
}

func publisher(node *centrifuge.Node) http.Handler {
	upgrader := websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer conn.Close()
		var buf []byte
		for {
			_, raw, err := conn.ReadMessage()
			if err != nil {
				return
			}
			var t trigger
			if json.Unmarshal(raw, &t) != nil {
				continue
			}
			for r := 0; r < t.Rounds; r++ {
				for table := t.T0; table < t.T0+t.N; table++ {
					ts := time.Now().UnixNano() / 1000
					if t.Ts != nil {
						ts = *t.Ts
					}
					// Publish copies nothing it keeps: the memory broker hands the bytes to the
					// hub, which encodes the push (a new buffer) before returning.
					buf = rowsUpdated(buf, table, t.Seq+int64(r), ts)
					data := make([]byte, len(buf))
					copy(data, buf)
					if _, err := node.Publish("table-"+strconv.Itoa(table), data); err != nil {
						log.Printf("publish: %v", err)
					}
				}
			}
		}
	})
}

type envelope struct {
	Message json.RawMessage `json:"message"`
}

type routing struct {
	TableID *int `json:"table_id"`
}

func fail(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, `{"error":%q,"field":null}`, msg)
}

// apiPublish: POST /api/publish with tornado-rt's body (one envelope or an array of them).
func apiPublish(node *centrifuge.Node) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			fail(w, http.StatusMethodNotAllowed, "POST only")
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 10<<20))
		if err != nil {
			fail(w, http.StatusBadRequest, "cannot read the body")
			return
		}
		var envs []envelope
		if t := bytes.TrimLeft(body, " \t\r\n"); len(t) > 0 && t[0] == '{' {
			envs = make([]envelope, 1)
			err = json.Unmarshal(body, &envs[0])
		} else {
			err = json.Unmarshal(body, &envs)
		}
		if err != nil {
			fail(w, http.StatusBadRequest, "body is not valid JSON")
			return
		}
		channels := make([]string, len(envs))
		for i, e := range envs {
			var rt routing
			if len(e.Message) == 0 || json.Unmarshal(e.Message, &rt) != nil || rt.TableID == nil {
				fail(w, http.StatusBadRequest, fmt.Sprintf("[%d].message.table_id is missing", i))
				return
			}
			channels[i] = "table-" + strconv.Itoa(*rt.TableID)
		}
		for i, e := range envs {
			if _, err := node.Publish(channels[i], e.Message); err != nil {
				fail(w, http.StatusServiceUnavailable, err.Error())
				return
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprintf(w, `{"published":%d}`, len(envs))
	})
}

func main() {
	port := flag.Int("port", 0, "listen port")
	readyFile := flag.String("ready-file", "", "written once the server listens")
	lifetime := flag.Float64("lifetime", 1800, "exit by itself after this many seconds")
	flag.IntVar(&users, "users", 20000, "members of workspace 1 (user ids 1..N)")
	flag.IntVar(&tables, "tables", 20000, "tables 1..N, all in workspace 1")
	flag.Parse()
	time.AfterFunc(time.Duration(*lifetime*float64(time.Second)), func() { os.Exit(3) })

	cfg := centrifuge.DefaultConfig
	cfg.LogLevel = centrifuge.LogLevelError
	cfg.LogHandler = func(e centrifuge.LogEntry) { log.Printf("%s: %v", e.Message, e.Fields) }
	node, err := centrifuge.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	node.OnConnect(func(client *centrifuge.Client) {
		uid, _ := strconv.Atoi(client.UserID())
		client.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			if !canViewTable(uid, e.Channel) {
				cb(centrifuge.SubscribeReply{}, centrifuge.ErrorPermissionDenied)
				return
			}
			cb(centrifuge.SubscribeReply{}, nil)
		})
	})
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}

	mux := http.NewServeMux()
	mux.Handle("/connection/websocket", auth(centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{
		CheckOrigin:  func(*http.Request) bool { return true },
		PingInterval: 25 * time.Second,
	})))
	mux.Handle("/bench/publish", publisher(node))
	mux.Handle("/api/publish", apiPublish(node))

	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		log.Fatal(err)
	}
	if *readyFile != "" {
		tmp := *readyFile + ".tmp"
		if err := os.WriteFile(tmp, []byte(fmt.Sprintf("%d %d\n", os.Getpid(), *port)), 0o644); err != nil {
			log.Fatal(err)
		}
		if err := os.Rename(tmp, *readyFile); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Printf("READY pid=%d port=%d GOMAXPROCS=%d\n", os.Getpid(), *port, runtime.GOMAXPROCS(0))
	srv := &http.Server{Handler: mux}
	log.Fatal(srv.Serve(ln))
}
